//! The clusterset simulator behind `cargo bench --bench clusterset` (see that file for what it
//! measures), here so that a test can run it small in CI and check its behaviour: every
//! endpoint change reaches every other cluster's subscriber.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use strait_api::pb;

use crate::figures::Figures;
use crate::haproxy::cpu_seconds;
use crate::load::{peak_rss_kib, percentile as pct, rss_kib};
use crate::{metric_sum, scrape, Mesh, MeshOptions};

/// The simulated size (defaults: Istio ambient's published multi-cluster test).
#[derive(Clone, Debug)]
pub struct Size {
    pub clusters: usize,
    pub services: usize,
    /// Per cluster, spread over the services.
    pub endpoints: usize,
    /// Endpoint changes per second, clusterset-wide.
    pub churn: f64,
    pub seconds: u64,
    /// Real sidecars per cluster.
    pub sidecars: usize,
    /// `strait up --sidecar-scope-namespaces`: the namespaces sidecars are sent (empty: all;
    /// the synthetic catalog is in `sim`, the sidecars' own service in `demo`).
    pub sidecar_scope: Vec<String>,
    /// Every controller's `batchWindow` (topology `batchWindow`), milliseconds; `None`: the
    /// controller's default.
    pub batch_window_ms: Option<u64>,
    /// `strait up --sidecar-scope-authorized`: sidecars are sent only the services whose
    /// AuthorizationPolicies could let them in.
    pub sidecar_scope_authorized: bool,
    /// AuthorizationPolicies written one after another after the churn, each in the next
    /// cluster (each refuses the sidecars one service of `sim`, and is then deleted).
    pub policies: usize,
}

impl Default for Size {
    fn default() -> Self {
        Size {
            clusters: 10,
            services: 300,
            endpoints: 4000,
            churn: 50.0,
            seconds: 30,
            sidecars: 1,
            sidecar_scope: vec![],
            batch_window_ms: None,
            sidecar_scope_authorized: false,
            policies: 10,
        }
    }
}

/// What a run measured (also printed, and written by [`Report::figures`]).
#[derive(Debug)]
pub struct Report {
    pub size: Size,
    pub changes: usize,
    /// Change -> delivered to (and ACKed by) each other cluster's probe, sorted.
    pub delays: Vec<Duration>,
    /// (change, other cluster) deliveries that never came though the change still stands.
    pub missing: usize,
    /// Deliveries of changes overwritten by a later change of the same endpoint first.
    pub superseded: usize,
    pub initial_sync: Duration,
    pub controller_rss_mib: Vec<f64>,
    /// Share of a core per controller during the churn.
    pub controller_cpu: Vec<f64>,
    pub sidecar_cpu: f64,
    pub gateway_cpu: f64,
    pub peering_bytes_per_pair: f64,
    /// Services the controllers sent their peers during the churn: whole, and as patches of
    /// the endpoints that changed.
    pub peering_services: PeeringServices,
    pub sidecar_rss_mib: Vec<f64>,
    /// Each sidecar's heap at the end of the churn (`strait_memory_allocated_bytes`), MiB.
    pub sidecar_heap_mib: Vec<f64>,
    /// Each sidecar's RSS at the very end, after every controller restarted (each sidecar said
    /// what it held and was sent what differs from it), MiB.
    pub sidecar_rss_after_restart_mib: Vec<f64>,
    /// Each sidecar's peak RSS over the run (`VmHWM`; the bench's reads of its `/config`, a
    /// dump of the whole catalog, included), MiB.
    pub sidecar_peak_rss_mib: Vec<f64>,
    /// Endpoints in `sim` each probe held at the end (deltas applied right: clusters x endpoints).
    pub final_endpoints: Vec<usize>,
    /// For each real sidecar at the end (its `/config`, up to 10 s after the churn): endpoints
    /// of `sim` it held at an address no longer standing, plus standing ones it lacked (0: the
    /// deltas left exactly the standing catalog; a sidecar scoped by authorization too, since no
    /// policy refuses it anything during the churn).
    pub sidecar_endpoints_wrong: Vec<usize>,
    /// What cluster 0's gateway restart sent between controllers.
    pub gateway_restart: GatewayRestart,
    /// From `kill -9` of one controller until its subscribers hold the whole catalog again.
    pub restart_resync: Duration,
    /// Peering bytes sent by every controller in the 10 s after that kill ...
    pub restart_peering: PeeringSent,
    /// ... and in 10 quiet seconds before it.
    pub quiet_bytes: f64,
    /// Peering bytes of the first sync: every cluster's whole catalog to every peer.
    pub initial_sync_bytes: f64,
    /// From `kill -9` of every controller at once until every subscriber holds the whole
    /// catalog again ...
    pub restart_all_resync: Duration,
    /// ... and the peering bytes of the 10 s after (a storm would be several first syncs).
    pub restart_all_peering: PeeringSent,
    /// What each sidecar's Hello said it held when it last resumed (`held_bytes` of its log's
    /// last `config resumed` line), bytes; none when no sidecar resumed.
    pub sidecar_held_bytes: Vec<f64>,
    /// What the restarted controller sent its proxies on the config stream, in the 10 s after
    /// it was killed ...
    pub restart_config: ConfigSent,
    /// ... and what every restarted controller sent.
    pub restart_all_config: ConfigSent,
    pub policies: PolicyRounds,
}

/// Config updates a controller sent its proxies (`strait_config_sent_{updates,bytes}_total`),
/// as (updates, bytes): the whole state to those that said nothing of what they held (the
/// simulator's probes), only what differs to those that did (every sidecar and gateway).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigSent {
    pub full: (f64, f64),
    pub resumed: (f64, f64),
}

impl ConfigSent {
    /// Read from each controller at `admins` (a restarted controller counts from 0).
    async fn of(admins: &[std::net::SocketAddr]) -> anyhow::Result<ConfigSent> {
        let mut sent = ConfigSent::default();
        for a in admins {
            let text = scrape(*a).await?;
            let read = |update: &str| {
                (
                    metric_sum(&text, "strait_config_sent_updates_total", &[("update", update)]),
                    metric_sum(&text, "strait_config_sent_bytes_total", &[("update", update)]),
                )
            };
            let (full, resumed) = (read("full"), read("resumed"));
            sent.full = (sent.full.0 + full.0, sent.full.1 + full.1);
            sent.resumed = (sent.resumed.0 + resumed.0, sent.resumed.1 + resumed.1);
        }
        Ok(sent)
    }

    /// Bytes per update, full and resumed.
    pub fn per_proxy(&self) -> (f64, f64) {
        let per = |(n, b): (f64, f64)| if n > 0.0 { b / n } else { 0.0 };
        (per(self.full), per(self.resumed))
    }
}

/// What the policy rounds measured, each sorted.
#[derive(Debug, Default)]
pub struct PolicyRounds {
    /// From `strait apply`'s start to each cluster's controller reporting every one of its
    /// proxies acknowledged the policy, per (policy, cluster).
    pub to_ack: Vec<Duration>,
    /// With sidecars scoped by authorization: from `strait apply`'s start until each sidecar no
    /// longer holds the service the policy refuses it ...
    pub to_scoped_out: Vec<Duration>,
    /// Then the policy is edited (its next generation refuses them still): from `strait
    /// apply`'s start until each cluster reports every proxy acknowledged the edit ...
    pub edit_to_ack: Vec<Duration>,
    /// ... and, with sidecars scoped by authorization, how many (policy, sidecar) pairs held the
    /// service at some poll while the edit spread (until 0.5 s after the last acknowledgement),
    /// of how many watched.
    pub edit_regained: usize,
    pub edit_watched: usize,
    /// ... and from `strait delete`'s start until it holds it again.
    pub to_scoped_in: Vec<Duration>,
    /// The CPU seconds every controller used over all the rounds together (their answers to
    /// the rounds' polling of `/policies` included).
    pub controller_cpu: f64,
}

/// "p50 .. ms, p99 .. ms, max .. ms" of sorted durations.
fn spread(d: &[Duration]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(pct(d, 0.5)),
        ms(pct(d, 0.99)),
        ms(d.last().copied().unwrap_or_default())
    )
}

fn cluster_name(c: usize) -> String {
    format!("c{c:02}")
}

fn zones(c: usize) -> [String; 2] {
    [format!("z{c:02}-a"), format!("z{c:02}-b")]
}

fn topology(a: &Size) -> String {
    let mut t = String::from("trustDomain: mesh.local\nservices:\n  - {name: probe, port: 80, protocol: http}\n");
    if let Some(ms) = a.batch_window_ms {
        t += &format!("batchWindow: {ms}ms\n");
    }
    t += "clusters:\n";
    for c in 0..a.clusters {
        let [za, zb] = zones(c);
        t += &format!(
            "  - name: {}\n    region: region-{}\n    zones: [{za}, {zb}]\n    workloads:\n",
            cluster_name(c),
            c % 5
        );
        for _ in 0..a.sidecars {
            t += &format!("      - {{service: probe, zone: {za}}}\n");
        }
    }
    t
}

/// One cluster's synthetic endpoints: `(service index, address)`, addresses unique clusterset-wide.
struct Catalog {
    cluster: usize,
    services: usize,
    endpoints: Vec<(usize, String)>,
    next_port: u16,
}

impl Catalog {
    fn new(cluster: usize, a: &Size) -> Self {
        let endpoints = (0..a.endpoints)
            .map(|e| (e % a.services, Self::address(cluster, e, 10_000)))
            .collect();
        Catalog {
            cluster,
            services: a.services,
            endpoints,
            next_port: 10_001,
        }
    }

    fn address(cluster: usize, e: usize, port: u16) -> String {
        format!("10.{}.{}.{}:{port}", cluster, e / 250, e % 250 + 1)
    }

    /// Moves endpoint `e` to a new address; returns it.
    fn churn(&mut self, e: usize) -> String {
        self.next_port = self.next_port.checked_add(1).unwrap_or(10_001);
        let addr = Self::address(self.cluster, e, self.next_port);
        self.endpoints[e].1 = addr.clone();
        addr
    }

    /// Service `s`'s catalog file: the service with this cluster's endpoints of it.
    fn yaml(&self, s: usize) -> String {
        let zones = zones(self.cluster);
        let mut y = format!(
            "services:\n  - name: svc-{s:04}\n    namespace: sim\n    serviceAccount: sim\n    ports: [{{name: http, port: 80, protocol: http}}]\n    endpoints:\n"
        );
        for (e, (_, addr)) in self.endpoints.iter().enumerate().filter(|(_, (svc, _))| *svc == s) {
            y += &format!(
                "      - {{workload: w-{}-{e}, address: \"{addr}\", zone: {}}}\n",
                self.cluster,
                zones[e % 2]
            );
        }
        y
    }

    /// Replaces service `s`'s file whole (a rename, so the controller never reads half of it):
    /// one file per service, as a Kubernetes controller gets one event per EndpointSlice.
    fn write(&self, dir: &std::path::Path, s: usize) {
        let tmp = dir.join(".sim.tmp");
        std::fs::write(&tmp, self.yaml(s)).unwrap();
        std::fs::rename(&tmp, dir.join(format!("sim-{s:04}.yaml"))).unwrap();
    }

    fn write_all(&self, dir: &std::path::Path) {
        for s in 0..self.services {
            self.write(dir, s);
        }
    }
}

/// Changes not yet seen by every other cluster's probe: address -> (made at, origin cluster).
type Pending = Arc<Mutex<HashMap<String, (Instant, usize)>>>;

/// What the probes saw.
#[derive(Default)]
struct Seen {
    /// Endpoints in `sim` each probe holds now.
    endpoints: Vec<usize>,
    /// Config streams each probe has opened.
    sessions: Vec<usize>,
    /// Change -> delivery latencies, one per (change, other cluster).
    delays: Vec<Duration>,
    /// (address, probe cluster) already counted.
    counted: std::collections::HashSet<(String, usize)>,
}

/// Subscribes to cluster `c`'s controller as a proxy would, ACKs every version, and records
/// when pending changes from other clusters arrive.
async fn probe(c: usize, controller: String, store: strait_trust::CertStore, pending: Pending, seen: Arc<Mutex<Seen>>) {
    // Like a sidecar, subscribe again when the controller goes away.
    loop {
        probe_session(c, &controller, &store, &pending, &seen).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn probe_session(
    c: usize,
    controller: &str,
    store: &strait_trust::CertStore,
    pending: &Pending,
    seen: &Arc<Mutex<Seen>>,
) {
    let td = store.id().trust_domain().clone();
    let controller_id =
        strait_trust::SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::FEDERATION_SA).unwrap();
    let Ok(config) = strait_trust::client_config(
        Some(store),
        store.bundle(),
        store.metrics(),
        strait_trust::PeerPolicy::OneOf(vec![controller_id]),
        &[strait_trust::ALPN_H2],
    ) else {
        return;
    };
    let channel = strait_api::transport::tls_channel(controller, Arc::new(config));
    let mut client = pb::config_service_client::ConfigServiceClient::new(channel)
        .max_decoding_message_size(strait_api::MAX_MESSAGE_BYTES);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::ProxyMessage {
        kind: Some(pb::proxy_message::Kind::Hello(pb::Hello {
            node: format!("sim-probe-{c}"),
            kind: "sidecar".into(),
            cluster: cluster_name(c),
            accepts_parts: true,
            accepts_endpoint_parts: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let Ok(updates) = client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
        return;
    };
    let mut updates = updates.into_inner();
    {
        // A new session holds nothing until its controller sends it the catalog.
        let mut seen = seen.lock().unwrap();
        seen.sessions[c] += 1;
        seen.endpoints[c] = 0;
    }
    let mut held: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(update)) = updates.message().await {
        let now = Instant::now();
        if update.full {
            held.clear();
        }
        for name in &update.removed {
            held.remove(name);
        }
        let mut arrived = vec![];
        for r in &update.resources {
            // A service comes as its fields and each cluster's endpoints (or, from an older
            // controller, whole): endpoints are counted by the resource that holds them.
            let (namespace, endpoints) = match &r.kind {
                Some(pb::resource::Kind::Service(s)) => (&s.namespace, &s.endpoints),
                Some(pb::resource::Kind::ServiceEndpoints(p)) => (&p.namespace, &p.endpoints),
                _ => continue,
            };
            if namespace != "sim" {
                continue;
            }
            held.insert(r.name.clone(), endpoints.len());
            arrived.extend(endpoints.iter().map(|e| e.address.clone()));
        }
        {
            let pending = pending.lock().unwrap();
            let mut seen = seen.lock().unwrap();
            for addr in arrived {
                if let Some((made, origin)) = pending.get(&addr) {
                    if *origin != c && seen.counted.insert((addr.clone(), c)) {
                        seen.delays.push(now - *made);
                    }
                }
            }
            seen.endpoints[c] = held.values().sum();
        }
        // A version in parts is ACKed once, after its last part.
        if update.more {
            continue;
        }
        let ack = pb::ProxyMessage {
            kind: Some(pb::proxy_message::Kind::Ack(pb::Ack {
                version: update.version,
                rejected: vec![],
            })),
        };
        if tx.send(ack).await.is_err() {
            return;
        }
    }
}

/// Exported services sent to peers (`strait_peering_services_sent_total`): whole, and as
/// patches of the endpoints that changed.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeeringServices {
    pub whole: f64,
    pub patched: f64,
}

impl PeeringServices {
    /// From one controller's metrics.
    pub fn of(metrics: &str) -> Self {
        let sent = |how| metric_sum(metrics, PEERING_SERVICES, &[("as", how)]);
        PeeringServices {
            whole: sent("whole"),
            patched: sent("patch"),
        }
    }

    /// Summed over every controller at `admins`.
    async fn read(admins: &[std::net::SocketAddr]) -> Self {
        let name = PEERING_SERVICES;
        let [whole, patched] = peering_metrics(admins, [(name, &[("as", "whole")]), (name, &[("as", "patch")])]).await;
        PeeringServices {
            whole: whole.iter().sum(),
            patched: patched.iter().sum(),
        }
    }

    pub fn since(self, before: Self) -> Self {
        PeeringServices {
            whole: self.whole - before.whole,
            patched: self.patched - before.patched,
        }
    }
}

const PEERING_SERVICES: &str = "strait_peering_services_sent_total";

/// How long after a restart its peering bytes are counted.
const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// Each controller's peering bytes sent so far. A scrape can time out on a saturated machine:
/// it is tried again, and a controller that never answers counts as NaN (a figure that is
/// visibly missing), never as 0 (which would read as a counter reset).
async fn peering_sent(admins: &[std::net::SocketAddr]) -> Vec<f64> {
    let [sent] = peering_metrics(admins, [("strait_peering_sent_bytes_total", &[])]).await;
    sent
}

/// [`peering_sent`] of several metrics (each a name and the labels it must carry), read from
/// one scrape of each controller: for each metric, its sum in each controller.
async fn peering_metrics<const N: usize>(
    admins: &[std::net::SocketAddr],
    metrics: [(&str, &[(&str, &str)]); N],
) -> [Vec<f64>; N] {
    let mut out: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(admins.len()));
    for a in admins {
        let mut text = None;
        for _ in 0..5 {
            if let Ok(t) = scrape(*a).await {
                text = Some(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (values, (name, labels)) in out.iter_mut().zip(metrics) {
            values.push(text.as_deref().map_or(f64::NAN, |t| metric_sum(t, name, labels)));
        }
    }
    out
}

/// Peering bytes sent between two readings. A restarted controller's counter starts again
/// from 0: all it counts is new. (Comparing counters cannot tell: a controller restarted twice
/// may count more the second time.)
fn sent_since(before: &[f64], after: &[f64], restarted: &[usize]) -> f64 {
    before
        .iter()
        .zip(after)
        .enumerate()
        .map(|(c, (b, a))| {
            if restarted.contains(&c) {
                *a
            } else {
                not_below_zero(a - b)
            }
        })
        .sum()
}

/// `kill -9` of cluster `c`'s gateway, then its own command again: every peering stream into
/// the cluster (they come through its gateway) breaks, and each peer dials again while the
/// cluster's controller still holds its exports. Measured from the kill until every peer
/// renewed its exports there over a new stream, or for [`RESTART_WINDOW`] if that is longer.
async fn restart_gateway(mesh: &mut Mesh, admins: &[std::net::SocketAddr], c: usize) -> anyhow::Result<GatewayRestart> {
    let before = PeeringSent::read(admins).await;
    let gateway = mesh.info.clusters[c].gateway.clone();
    let peers: Vec<String> = (0..mesh.info.clusters.len())
        .filter(|p| *p != c)
        .map(|p| mesh.info.clusters[p].name.clone())
        .collect();
    let env = Mesh::restart_environment(gateway.pid);
    mesh.kill9(gateway.pid);
    let killed_at = Instant::now();
    mesh.restart_component(&gateway, &env).await?;
    let started = killed_at.elapsed();
    let mut ready = None;
    let mut first_back = None;
    // A renewal later than this came over a new stream: the old gateway is gone and the new
    // one is not yet listening (one in flight through the old gateway landed before).
    let restarted_unix_ms = strait_api::unix_ms(std::time::SystemTime::now());
    let back = loop {
        let status = Mesh::admin_json(admins[c], "/status").await.unwrap_or_default();
        let renewed = |name: &String| {
            status["peers"].as_array().into_iter().flatten().any(|p| {
                p["name"] == name.as_str()
                    && p["connected"] == true
                    && p["last_renewed_unix_ms"]
                        .as_i64()
                        .is_some_and(|at| at > restarted_unix_ms)
            })
        };
        if ready.is_none()
            && crate::client::plain_get(gateway.admin_addr, "/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
        {
            ready = Some(killed_at.elapsed());
        }
        let back = peers.iter().filter(|p| renewed(p)).count();
        if back > 0 && first_back.is_none() {
            first_back = Some(killed_at.elapsed());
        }
        if back == peers.len() {
            break killed_at.elapsed();
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let log = &mesh.info.clusters[c].controller.log;
            anyhow::bail!(
                "60 s after cluster {c}'s gateway restarted, not every peer renewed its exports there over a new stream: {}\nthe end of {}:\n{}\nthe end of {}:\n{}",
                status["peers"],
                log.display(),
                log_tail(log),
                gateway.log.display(),
                log_tail(&gateway.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let window = back.max(RESTART_WINDOW);
    if let Some(rest) = (killed_at + window).checked_duration_since(Instant::now()) {
        tokio::time::sleep(rest).await;
    }
    Ok(GatewayRestart {
        started,
        ready: ready.unwrap_or(back),
        first_back: first_back.unwrap_or(back),
        back,
        window,
        sent: PeeringSent::since(&before, &PeeringSent::read(admins).await, &[]),
    })
}

/// What cluster 0's gateway restart cost ([`restart_gateway`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayRestart {
    /// From `kill -9` until the new gateway process was started (once its addresses could be
    /// bound) ...
    pub started: Duration,
    /// ... until it answered ready (its certificate and first config taken, listening) ...
    pub ready: Duration,
    /// ... until the first peer renewed its exports there over a new stream ...
    pub first_back: Duration,
    /// ... and until every peer had.
    pub back: Duration,
    /// What every controller sent its peers from the kill, in ...
    pub sent: PeeringSent,
    /// ... this window: until `back`, or 10 s if longer.
    pub window: Duration,
}

/// Peering updates every controller sent in a window, by kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeeringSent {
    /// Bytes of every update ...
    pub bytes: f64,
    /// ... of them, in updates of every export (to a peer that held nothing of the sender, or
    /// said nothing of what it held) ...
    pub full_bytes: f64,
    /// ... and the updates to a peer that said what it held, with their bytes.
    pub resumed: (f64, f64),
}

impl PeeringSent {
    /// Each controller's counters (one scrape each): total bytes, full bytes, resumed updates
    /// and resumed bytes.
    async fn read(admins: &[std::net::SocketAddr]) -> [Vec<f64>; 4] {
        peering_metrics(
            admins,
            [
                ("strait_peering_sent_bytes_total", &[]),
                ("strait_peering_sent_bytes_total", &[("update", "full")]),
                ("strait_peering_updates_sent_total", &[("update", "resumed")]),
                ("strait_peering_sent_bytes_total", &[("update", "resumed")]),
            ],
        )
        .await
    }

    /// What was sent between two [`PeeringSent::read`]s, the controllers of `restarted`
    /// counting from 0 ([`sent_since`]).
    fn since(before: &[Vec<f64>; 4], after: &[Vec<f64>; 4], restarted: &[usize]) -> Self {
        let since = |i: usize| sent_since(&before[i], &after[i], restarted);
        PeeringSent {
            bytes: since(0),
            full_bytes: since(1),
            resumed: (since(2), since(3)),
        }
    }
}

/// `kill -9` of the controllers of `clusters` (their `pids`, updated with the new ones), then
/// their own commands again. Returns the time until every subscriber of those clusters holds
/// the whole catalog (`want` endpoints) in a new session, and the peering bytes every
/// controller sent in the [`RESTART_WINDOW`] from the kill.
async fn restart_controllers(
    mesh: &mut Mesh,
    seen: &Arc<Mutex<Seen>>,
    admins: &[std::net::SocketAddr],
    pids: &mut [u32],
    clusters: &[usize],
    want: usize,
) -> anyhow::Result<(Duration, PeeringSent, ConfigSent)> {
    let before = PeeringSent::read(admins).await;
    let sessions_before = seen.lock().unwrap().sessions.clone();
    for c in clusters {
        mesh.kill9(pids[*c]);
    }
    let killed_at = Instant::now();
    for c in clusters {
        let controller = mesh.info.clusters[*c].controller.clone();
        pids[*c] = mesh.restart_component(&controller, &[]).await?;
    }
    let resync = loop {
        {
            let s = seen.lock().unwrap();
            if clusters
                .iter()
                .all(|c| s.sessions[*c] > sessions_before[*c] && s.endpoints[*c] >= want)
            {
                break killed_at.elapsed();
            }
            // A restarted controller that exited at once (it could not bind a port, say) is
            // reported now, with its log and who holds its admin port, not after the wait.
            for c in clusters {
                let controller = &mesh.info.clusters[*c].controller;
                let st = pid_state(pids[*c]);
                if st.is_none() || st == Some('Z') {
                    anyhow::bail!(
                        "the restarted controller of cluster {c} (pid {}) exited; the end of {}:\n{}\nsockets on its admin port {}:\n{}",
                        pids[*c],
                        controller.log.display(),
                        log_tail(&controller.log),
                        controller.admin_addr,
                        crate::mesh::sockets_on(controller.admin_addr.port())
                    );
                }
            }
            if killed_at.elapsed() > Duration::from_secs(180) {
                // The log of each cluster whose subscriber is not whole, and whether its
                // controller runs.
                let behind: Vec<String> = clusters
                    .iter()
                    .filter(|c| !(s.sessions[**c] > sessions_before[**c] && s.endpoints[**c] >= want))
                    .map(|c| {
                        let log = &mesh.info.clusters[*c].controller.log;
                        let state = pid_state(pids[*c]).map_or("gone".to_string(), |st| format!("state {st}"));
                        format!(
                            "cluster {c}: controller pid {} {state}; the end of {}:\n{}",
                            pids[*c],
                            log.display(),
                            log_tail(log)
                        )
                    })
                    .collect();
                anyhow::bail!(
                    "after the controllers of clusters {clusters:?} restarted, their subscribers never held the whole catalog ({want} endpoints) again: sessions {:?} (before {sessions_before:?}), endpoints held {:?}\n{}",
                    s.sessions,
                    s.endpoints,
                    behind.join("\n")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(rest) = (killed_at + RESTART_WINDOW).checked_duration_since(Instant::now()) {
        tokio::time::sleep(rest).await;
    }
    let restarted: Vec<std::net::SocketAddr> = clusters.iter().map(|c| admins[*c]).collect();
    Ok((
        resync,
        PeeringSent::since(&before, &PeeringSent::read(admins).await, clusters),
        ConfigSent::of(&restarted).await?,
    ))
}

/// A process's state letter (`R`, `S`, `Z`, ...), or `None` once it is gone.
fn pid_state(pid: u32) -> Option<char> {
    crate::mesh::process_state(format!("/proc/{pid}/stat").as_ref())
}

/// The last 15 lines of a process's log (for a failure's message).
fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The `held_bytes` of a proxy log's last `config resumed` line: what its Hello said it held.
fn held_bytes(log: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rfind(|l| l.contains("config resumed"))?;
    line.split_once("held_bytes=")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `d`, or 0 when negative; unlike `f64::max`, a missing figure (NaN) stays missing.
fn not_below_zero(d: f64) -> f64 {
    if d < 0.0 {
        0.0
    } else {
        d
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

/// Starts the clusterset, loads the synthetic catalogs, churns them and measures.
pub async fn run(a: Size) -> anyhow::Result<Report> {
    let n = a.clusters;
    anyhow::ensure!(
        n >= 2 && a.services >= 1 && a.endpoints >= a.services && n <= 250,
        "need 2..=250 clusters and at least one endpoint per service: {a:?}"
    );
    let mut extra_args = vec![];
    if !a.sidecar_scope.is_empty() {
        extra_args = vec!["--sidecar-scope-namespaces".to_string(), a.sidecar_scope.join(",")];
    }
    if a.sidecar_scope_authorized {
        extra_args.push("--sidecar-scope-authorized".to_string());
    }
    let mut mesh = Mesh::start_with(MeshOptions {
        topology: Some(topology(&a)),
        extra_args,
        ..Default::default()
    })
    .await?;

    // Probes, one per cluster, with certificates from that cluster's CA.
    let td: strait_trust::TrustDomain = mesh.info.trust_domain.parse()?;
    let bundle = strait_trust::TrustBundle::load(&mesh.info.bundle)?;
    let pending: Pending = Arc::default();
    let seen = Arc::new(Mutex::new(Seen {
        endpoints: vec![0; n],
        sessions: vec![0; n],
        ..Default::default()
    }));
    for (c, info) in mesh.info.clusters.iter().enumerate() {
        let ca = strait_trust::Authority::load(&mesh.info.state_dir.join(&info.name).join("ca"), &td)?;
        let id: strait_trust::SpiffeId = format!("spiffe://{td}/ns/sim/sa/probe").parse()?;
        let store = strait_trust::CertStore::issued_by(
            &ca,
            id,
            Duration::from_secs(24 * 3600),
            bundle.clone(),
            strait_trust::TlsMetrics::unregistered(),
        )?;
        tokio::spawn(probe(
            c,
            info.controller.addr.clone(),
            store,
            pending.clone(),
            seen.clone(),
        ));
    }

    // The synthetic catalogs, then the wait for every probe to hold all of them.
    let mut catalogs: Vec<Catalog> = (0..n).map(|c| Catalog::new(c, &a)).collect();
    let dirs: Vec<std::path::PathBuf> = mesh
        .info
        .clusters
        .iter()
        .map(|c| c.controller.catalog_dir.clone())
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow::anyhow!("the simulator needs file-backed controllers"))?;
    let admins: Vec<std::net::SocketAddr> = mesh.info.clusters.iter().map(|c| c.controller.admin_addr).collect();
    // Summed over the controllers, the clusterset's peering bytes so far.
    let peering_bytes = || async { peering_sent(&admins).await.iter().sum::<f64>() };
    let sync_bytes_before = peering_bytes().await;
    let sync = Instant::now();
    for (c, cat) in catalogs.iter().enumerate() {
        cat.write_all(&dirs[c]);
    }
    let want = n * a.endpoints;
    let mut last_print = Instant::now();
    loop {
        let have = seen.lock().unwrap().endpoints.clone();
        if have.iter().all(|h| *h >= want) {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!(
                "  initial sync: probes hold {}..{} of {want} endpoints after {:.0}s",
                have.iter().min().unwrap_or(&0),
                have.iter().max().unwrap_or(&0),
                sync.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        anyhow::ensure!(
            sync.elapsed() < Duration::from_secs(600),
            "the catalog never converged: probes hold {have:?} of {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let initial_sync = sync.elapsed();
    let initial_sync_bytes = peering_bytes().await - sync_bytes_before;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Churn, with each process's CPU and the peering bytes over the same period.
    let controllers: Vec<u32> = mesh.info.clusters.iter().map(|c| c.controller.pid).collect();
    let sidecar_pids: Vec<u32> = mesh
        .info
        .clusters
        .iter()
        .flat_map(|c| c.workloads.iter().map(|w| w.sidecar_pid))
        .collect();
    let gateway_pids: Vec<u32> = mesh.info.clusters.iter().map(|c| c.gateway.pid).collect();
    let total_cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let bytes_before = peering_bytes().await;
    let services_before = PeeringServices::read(&admins).await;
    let cpu_before: Vec<f64> = controllers.iter().map(|p| cpu_seconds(*p)).collect();
    let others_before = (total_cpu(&sidecar_pids), total_cpu(&gateway_pids));
    let churn_start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / a.churn.max(0.001));
    let mut changes = 0usize;
    let mut rng = rand::rng();
    while churn_start.elapsed() < Duration::from_secs(a.seconds) {
        let due = churn_start + interval * changes as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let c = rng.random_range(0..n);
        let e = rng.random_range(0..a.endpoints);
        let addr = catalogs[c].churn(e);
        pending.lock().unwrap().insert(addr, (Instant::now(), c));
        catalogs[c].write(&dirs[c], catalogs[c].endpoints[e].0);
        changes += 1;
    }
    let churned = churn_start.elapsed().as_secs_f64();
    let controller_cpu: Vec<f64> = controllers
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| (cpu_seconds(*p) - b) / churned)
        .collect();
    let bytes = peering_bytes().await - bytes_before;
    let peering_services = PeeringServices::read(&admins).await.since(services_before);
    let sidecar_cpu = (total_cpu(&sidecar_pids) - others_before.0) / churned / sidecar_pids.len().max(1) as f64;
    let gateway_cpu = (total_cpu(&gateway_pids) - others_before.1) / churned / gateway_pids.len() as f64;

    // Let the last changes land (up to 10 s). A change a later change of the same endpoint
    // overwrote is never seen by its address where it had not yet arrived: "superseded", apart
    // from "missing" (still current, not delivered).
    let expected = changes * (n - 1);
    let settle = Instant::now();
    while seen.lock().unwrap().delays.len() < expected && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut delays = seen.lock().unwrap().delays.clone();
    delays.sort();
    let (missing, superseded) = {
        let pending = pending.lock().unwrap();
        let seen = seen.lock().unwrap();
        let current: std::collections::HashSet<&String> = catalogs
            .iter()
            .flat_map(|c| c.endpoints.iter().map(|(_, a)| a))
            .collect();
        let mut missing = 0;
        let mut superseded = 0;
        for (addr, (_, origin)) in pending.iter() {
            for c in (0..n).filter(|c| c != origin) {
                if !seen.counted.contains(&(addr.clone(), c)) {
                    if current.contains(addr) {
                        missing += 1;
                    } else {
                        superseded += 1;
                    }
                }
            }
        }
        (missing, superseded)
    };
    let controller_rss_mib = controllers.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();
    let sidecar_rss_mib = sidecar_pids.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();
    // What of that is heap, by the allocator's own count (the rest is mostly the executable's
    // text, shared by every process running it).
    let mut sidecar_heap_mib = vec![];
    for w in mesh.info.clusters.iter().flat_map(|c| c.workloads.iter()) {
        if let Ok(m) = crate::metrics::scrape(w.admin_addr).await {
            sidecar_heap_mib
                .push(crate::metrics::metric_sum(&m, "strait_memory_allocated_bytes", &[]) / (1024.0 * 1024.0));
        }
    }
    let final_endpoints = seen.lock().unwrap().endpoints.clone();
    let standing: std::collections::HashSet<String> = catalogs
        .iter()
        .flat_map(|c| c.endpoints.iter().map(|(_, a)| a.clone()))
        .collect();
    let mut sidecar_endpoints_wrong = vec![];
    for w in mesh.info.clusters.iter().flat_map(|c| c.workloads.iter()) {
        let waited = Instant::now();
        let wrong = loop {
            let config = Mesh::admin_json(w.admin_addr, "/config").await?;
            let held: std::collections::HashSet<&str> = config["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["host"].as_str().is_some_and(|h| h.contains(".sim.")))
                .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                .filter_map(|e| e["address"].as_str())
                .collect();
            let stale = held.iter().filter(|a| !standing.contains(**a)).count();
            let lacking = standing.iter().filter(|a| !held.contains(a.as_str())).count();
            if stale + lacking == 0 || waited.elapsed() > Duration::from_secs(10) {
                break stale + lacking;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        sidecar_endpoints_wrong.push(wrong);
    }
    let cpu_before = total_cpu(&controllers);
    let mut policies = policy_rounds(&mesh, &a, &admins).await?;
    policies.controller_cpu = total_cpu(&controllers) - cpu_before;

    // A controller restarts (kill -9, then its own command): how long until its subscribers
    // hold the whole catalog again, and what the clusterset sends meanwhile beside what it
    // sends when nothing happens. Peers resend their exports to it; nothing else should move.
    let quiet_before = peering_sent(&admins).await;
    tokio::time::sleep(RESTART_WINDOW).await;
    let quiet_bytes = sent_since(&quiet_before, &peering_sent(&admins).await, &[]);

    // A gateway restarts: the peering streams into its cluster break and come back while its
    // controller still holds every peer's exports, so each peer sends what differs from them
    // (nothing changed meanwhile) instead of all its exports again.
    let gateway_restart = restart_gateway(&mut mesh, &admins, 0).await?;
    let mut pids: Vec<u32> = mesh.info.clusters.iter().map(|c| c.controller.pid).collect();
    let (restart_resync, restart_peering, restart_config) =
        restart_controllers(&mut mesh, &seen, &admins, &mut pids, &[0], want).await?;

    // Every controller at once (a control-plane upgrade, a region's power): each resends its
    // exports to each peer once, no more.
    let every: Vec<usize> = (0..n).collect();
    let (restart_all_resync, restart_all_peering, restart_all_config) =
        restart_controllers(&mut mesh, &seen, &admins, &mut pids, &every, want).await?;
    let sidecar_rss_after_restart_mib = sidecar_pids.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();
    let sidecar_peak_rss_mib = sidecar_pids.iter().map(|p| peak_rss_kib(*p) as f64 / 1024.0).collect();
    let sidecar_held_bytes = mesh
        .info
        .clusters
        .iter()
        .flat_map(|c| &c.workloads)
        .filter_map(|w| held_bytes(&w.sidecar_log))
        .collect();
    Ok(Report {
        changes,
        delays,
        missing,
        superseded,
        initial_sync,
        controller_rss_mib,
        controller_cpu,
        sidecar_cpu,
        gateway_cpu,
        peering_bytes_per_pair: bytes / churned / (n * (n - 1)) as f64,
        peering_services,
        sidecar_rss_mib,
        sidecar_heap_mib,
        sidecar_rss_after_restart_mib,
        sidecar_peak_rss_mib,
        sidecar_held_bytes,
        final_endpoints,
        sidecar_endpoints_wrong,
        gateway_restart,
        restart_resync,
        restart_peering,
        restart_all_resync,
        restart_all_peering,
        restart_config,
        restart_all_config,
        initial_sync_bytes,
        quiet_bytes,
        policies,
        size: a,
    })
}

/// `a.policies` AuthorizationPolicies, one after another, each written in the next cluster
/// (`strait apply --wait 0s`) and refusing the sidecars' identity one service of `sim`: how
/// long until each cluster's controller reports all its proxies acknowledged it, and with
/// sidecars scoped by authorization, until each sidecar no longer holds that service; then an
/// edit that still refuses them (each cluster's acknowledgement of the generation the edit wrote, and
/// whether any sidecar held the service again meanwhile); then `strait delete`, and until each
/// sidecar holds the service again. Polls every 10 ms; each round waits for the one before to be
/// gone everywhere.
async fn policy_rounds(mesh: &Mesh, a: &Size, admins: &[std::net::SocketAddr]) -> anyhow::Result<PolicyRounds> {
    const LIMIT: Duration = Duration::from_secs(60);
    let clusters: Vec<String> = mesh.info.clusters.iter().map(|c| c.name.clone()).collect();
    let sidecars: Vec<&crate::WorkloadInfo> = mesh.info.clusters.iter().flat_map(|c| &c.workloads).collect();
    let Some(first) = sidecars.first() else {
        return Ok(PolicyRounds::default());
    };
    let principal = format!(
        "spiffe://{}/ns/{}/sa/{}",
        mesh.info.trust_domain, first.namespace, first.service
    );
    // Whether the sidecar answering on `admin` would route to `host` (`strait route explain`).
    let holds = |admin: std::net::SocketAddr, host: String| async move {
        let view = Mesh::admin_json(admin, &format!("/explain?url=http://{host}/"))
            .await
            .unwrap_or_default();
        view["service"].as_str() == Some(host.as_str())
    };
    // Policy `name` as cluster `c`'s controller lists it (`None`: not listed).
    let listed_in = |c: usize, name: String| async move {
        let view = Mesh::admin_json(admins[c], "/policies").await.unwrap_or_default();
        view["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .cloned()
    };
    // Whether cluster `c`'s own report on policy `name` says every proxy there acknowledged its
    // generation `generation` (or a later one).
    let acked_in = |c: usize, name: String, generation: u64| {
        let (listed, cluster) = (listed_in(c, name), clusters[c].clone());
        async move {
            let policy = listed.await.unwrap_or_default();
            let own = policy["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["cluster"] == cluster.as_str())
                .cloned();
            own.is_some_and(|r| {
                r["serving_generation"].as_u64() >= Some(generation)
                    && r["proxies_total"].as_u64() > Some(0)
                    && r["proxies_acked"] == r["proxies_total"]
            })
        }
    };
    // The generation of policy `name` cluster `c` lists once it is later than `after`: what
    // `strait apply` wrote there.
    let written = |c: usize, name: String, after: u64| {
        let listed = move || listed_in(c, name.clone());
        async move {
            let started = Instant::now();
            loop {
                let generation = listed().await.and_then(|p| p["generation"].as_u64()).unwrap_or(0);
                if generation > after {
                    return Ok(generation);
                }
                anyhow::ensure!(
                    started.elapsed() < LIMIT,
                    "cluster {c} never listed a generation of the policy after {after}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Polls every sidecar at once (one after another, a pass over 50 sidecars outlasts the
    // 10 ms between passes): whether each holds `host`, for the sidecars `due` keeps.
    let poll_holds = |due: Vec<bool>, host: &str| {
        let polls: Vec<_> = sidecars
            .iter()
            .zip(due)
            .map(|(w, due)| {
                let held = holds(w.admin_addr, host.to_string());
                async move { due && held.await }
            })
            .collect();
        futures::future::join_all(polls)
    };
    let mut out = PolicyRounds::default();
    for i in 0..a.policies {
        let o = i % clusters.len();
        let origin = &clusters[o];
        let name = format!("bench-{i:03}");
        let service = format!("svc-{:04}", i % a.services);
        let host = format!("{service}.sim.svc.clusterset.local");
        // Refusing the sidecars' identity (and, edited, one more).
        let yaml = |principals: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: sim}}\nspec:\n  targetRefs: [{{kind: Service, name: {service}}}]\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [{principals}]}}}}]}}]\n"
            )
        };
        let (yaml, edited) = (
            yaml(&format!("\"{principal}\"")),
            yaml(&format!("\"{principal}\", \"{principal}-edited\"")),
        );
        let started = Instant::now();
        let (ok, stdout, stderr) = mesh.policy("apply", origin, &name, &yaml, "0s");
        anyhow::ensure!(ok, "strait apply {name}: {stdout}{stderr}");
        let generation = written(o, name.clone(), 0).await?;
        let mut acked = vec![None; clusters.len()];
        let mut out_of_scope = vec![None; if a.sidecar_scope_authorized { sidecars.len() } else { 0 }];
        while acked.iter().chain(&out_of_scope).any(Option::is_none) {
            anyhow::ensure!(
                started.elapsed() < LIMIT,
                "policy {name} written in {origin}: acknowledged in {:?}, out of the sidecars' scope {:?} after {LIMIT:?}",
                acked,
                out_of_scope
            );
            for (c, slot) in acked.iter_mut().enumerate() {
                if slot.is_none() && acked_in(c, name.clone(), generation).await {
                    *slot = Some(started.elapsed());
                }
            }
            let due: Vec<bool> = out_of_scope.iter().map(Option::is_none).collect();
            let held = poll_holds(due.clone(), &host).await;
            for ((slot, due), held) in out_of_scope.iter_mut().zip(due).zip(held) {
                if due && !held {
                    *slot = Some(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.to_ack.extend(acked.into_iter().flatten());
        out.to_scoped_out.extend(out_of_scope.into_iter().flatten());
        let edit = Instant::now();
        let (ok, stdout, stderr) = mesh.policy("apply", origin, &name, &edited, "0s");
        anyhow::ensure!(ok, "strait apply {name} (edited): {stdout}{stderr}");
        let edit_generation = written(o, name.clone(), generation).await?;
        let mut acked = vec![None; clusters.len()];
        let mut regained = vec![false; if a.sidecar_scope_authorized { sidecars.len() } else { 0 }];
        let settle = Duration::from_millis(500);
        while acked.iter().any(Option::is_none)
            || edit.elapsed() < acked.iter().flatten().max().copied().unwrap_or_default() + settle
        {
            anyhow::ensure!(
                edit.elapsed() < LIMIT,
                "policy {name} edited in {origin}: acknowledged in {acked:?} after {LIMIT:?}"
            );
            for (c, slot) in acked.iter_mut().enumerate() {
                if slot.is_none() && acked_in(c, name.clone(), edit_generation).await {
                    *slot = Some(edit.elapsed());
                }
            }
            let held = poll_holds(vec![true; regained.len()], &host).await;
            for (regained, held) in regained.iter_mut().zip(held) {
                *regained |= held;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.edit_to_ack.extend(acked.into_iter().flatten());
        out.edit_regained += regained.iter().filter(|h| **h).count();
        out.edit_watched += regained.len();
        let deleted = Instant::now();
        let (ok, stdout, stderr) = mesh.policy("delete", origin, &name, &yaml, "0s");
        anyhow::ensure!(ok, "strait delete {name}: {stdout}{stderr}");
        let mut back = vec![None; if a.sidecar_scope_authorized { sidecars.len() } else { 0 }];
        loop {
            let due: Vec<bool> = back.iter().map(Option::is_none).collect();
            for (slot, held) in back.iter_mut().zip(poll_holds(due, &host).await) {
                if held {
                    *slot = Some(deleted.elapsed());
                }
            }
            let mut gone = true;
            for c in 0..clusters.len() {
                gone &= listed_in(c, name.clone()).await.is_none();
            }
            if gone && back.iter().all(Option::is_some) {
                break;
            }
            anyhow::ensure!(
                deleted.elapsed() < LIMIT,
                "policy {name} deleted in {origin}: still listed somewhere, or back in the sidecars' scope only {back:?}, after {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.to_scoped_in.extend(back.into_iter().flatten());
    }
    out.to_ack.sort();
    out.edit_to_ack.sort();
    out.to_scoped_out.sort();
    out.to_scoped_in.sort();
    Ok(out)
}

impl Report {
    pub fn print(&self) {
        let remotes = (self.size.clusters - 1) as f64;
        let churned = self.size.seconds as f64;
        println!(
            "\nchurn: {} endpoint changes in {churned:.0}s ({:.1}/s)",
            self.changes,
            self.changes as f64 / churned
        );
        println!(
            "change -> delivered and ACKed in every other cluster: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} deliveries, {} missing, {} superseded; goal p99 <= 500 ms)",
            ms(pct(&self.delays, 0.5)),
            ms(pct(&self.delays, 0.99)),
            ms(self.delays.last().copied().unwrap_or_default()),
            self.delays.len(),
            self.missing,
            self.superseded
        );
        let rss = &self.controller_rss_mib;
        let cpu = &self.controller_cpu;
        println!(
            "controller RSS: mean {:.1} MiB, max {:.1} MiB; per remote cluster {:.2} MiB (goal <= 20 MB)",
            mean(rss),
            max(rss),
            mean(rss) / remotes
        );
        println!(
            "controller CPU during churn: mean {:.2}% of a core, max {:.2}%; per remote cluster {:.3}% (goal <= 0.2%)",
            mean(cpu) * 100.0,
            max(cpu) * 100.0,
            mean(cpu) * 100.0 / remotes
        );
        println!(
            "sidecar CPU during churn: mean {:.2}% of a core; gateway: mean {:.2}%",
            self.sidecar_cpu * 100.0,
            self.gateway_cpu * 100.0
        );
        println!(
            "peering: {:.0} bytes/s per cluster pair (encoded export updates, one direction); services sent during the churn: {:.0} as patches, {:.0} whole",
            self.peering_bytes_per_pair, self.peering_services.patched, self.peering_services.whole
        );
        let held = if self.size.sidecar_scope.is_empty() {
            format!(
                "the full catalog ({} endpoints)",
                self.size.clusters * self.size.endpoints
            )
        } else {
            format!("scope {}", self.size.sidecar_scope.join(","))
        };
        println!(
            "sidecar RSS with {held}: mean {:.1} MiB, max {:.1} MiB (goal <= 15 MiB)",
            mean(&self.sidecar_rss_mib),
            max(&self.sidecar_rss_mib)
        );
        println!(
            "sidecar heap (allocated, by the allocator's count): mean {:.1} MiB; the rest of its RSS is mostly the executable's text, shared by every process running it",
            mean(&self.sidecar_heap_mib)
        );
        println!(
            "sidecar RSS at the end, every controller restarted (each sidecar sent what differs from what it held): mean {:.1} MiB, max {:.1} MiB; peak over the run (VmHWM, this bench's reads of each sidecar's /config dump included): mean {:.1} MiB, max {:.1} MiB",
            mean(&self.sidecar_rss_after_restart_mib),
            max(&self.sidecar_rss_after_restart_mib),
            mean(&self.sidecar_peak_rss_mib),
            max(&self.sidecar_peak_rss_mib)
        );
        let wrong: usize = self.sidecar_endpoints_wrong.iter().sum();
        println!(
            "sidecars holding exactly the standing endpoints after the churn: {} of {}{}",
            self.sidecar_endpoints_wrong.iter().filter(|w| **w == 0).count(),
            self.sidecar_endpoints_wrong.len(),
            if wrong > 0 {
                format!(" ({wrong} endpoints stale or lacking)")
            } else {
                String::new()
            }
        );
        println!("initial sync to every probe: {:.2}s", self.initial_sync.as_secs_f64());
        let p = &self.policies;
        if !p.to_ack.is_empty() {
            println!(
                "AuthorizationPolicy written in one cluster -> every proxy of a cluster acknowledged it: {} ({} policies x {} clusters; from the strait apply command's start, polled every 10 ms)",
                spread(&p.to_ack),
                self.size.policies,
                self.size.clusters
            );
        }
        if !p.edit_to_ack.is_empty() {
            println!(
                "the policy edited (refusing them still) -> every proxy of a cluster acknowledged the edit: {}",
                spread(&p.edit_to_ack)
            );
        }
        if self.size.policies > 0 {
            println!(
                "controllers' CPU over the policy rounds (apply, edit, delete): {:.3} s per round, every controller together (their answers to the rounds' polling included)",
                p.controller_cpu / self.size.policies as f64
            );
        }
        if p.edit_watched > 0 {
            println!(
                "sidecars scoped by authorization that held the refused service again while an edit spread: {} of {} (policy x sidecar, polled every 10 ms until 0.5 s after the last acknowledgement)",
                p.edit_regained, p.edit_watched
            );
        }
        if !p.to_scoped_out.is_empty() {
            println!(
                "sidecars scoped by authorization: the service a new policy refuses them gone from each after p50 {:.1} ms, max {:.1} ms; back after its deletion p50 {:.1} ms, max {:.1} ms",
                ms(pct(&p.to_scoped_out, 0.5)),
                ms(p.to_scoped_out.last().copied().unwrap_or_default()),
                ms(pct(&p.to_scoped_in, 0.5)),
                ms(p.to_scoped_in.last().copied().unwrap_or_default()),
            );
        }
        let g = &self.gateway_restart;
        println!(
            "gateway restart (kill -9, cluster 0): the new gateway started after {:.2}s, ready after {:.2}s; the first peer's exports renewed there over a new stream after {:.2}s, every peer's after {:.2}s; {:.0} peers said what they held and were sent {:.0} B each; every export resent: {:.0} B; peering bytes in the {:.0} s after: {:.0} = {:.3} of the first sync's exports to one cluster ({:.0} B), beyond quiet traffic",
            g.started.as_secs_f64(),
            g.ready.as_secs_f64(),
            g.first_back.as_secs_f64(),
            g.back.as_secs_f64(),
            g.sent.resumed.0,
            g.sent.resumed.1 / g.sent.resumed.0.max(1.0),
            g.sent.full_bytes,
            g.window.as_secs_f64(),
            g.sent.bytes,
            self.gateway_restart_extra() / self.exports_to_one_cluster().max(1.0),
            self.exports_to_one_cluster()
        );
        println!(
            "controller restart (kill -9): its subscribers whole again after {:.2}s; peering bytes in the 10 s after: {:.0}, of which {:.0} in updates of every export, {:.0} resumed updates (10 quiet seconds: {:.0}; the first sync of the whole clusterset: {:.0}, so the restart cost {:.2} of it)",
            self.restart_resync.as_secs_f64(),
            self.restart_peering.bytes,
            self.restart_peering.full_bytes,
            self.restart_peering.resumed.0,
            self.quiet_bytes,
            self.initial_sync_bytes,
            self.restart_extra() / self.initial_sync_bytes.max(1.0)
        );
        println!(
            "every controller restarted at once (kill -9): every subscriber whole again after {:.2}s; peering bytes in the 10 s after: {:.0}, of which {:.0} in updates of every export, {:.0} resumed updates = {:.2} of the first sync (beyond quiet traffic)",
            self.restart_all_resync.as_secs_f64(),
            self.restart_all_peering.bytes,
            self.restart_all_peering.full_bytes,
            self.restart_all_peering.resumed.0,
            self.restart_all_extra() / self.initial_sync_bytes.max(1.0)
        );
        if !self.sidecar_held_bytes.is_empty() {
            println!(
                "each sidecar's Hello said what it held in {:.0} B (mean; max {:.0})",
                mean(&self.sidecar_held_bytes),
                max(&self.sidecar_held_bytes)
            );
        }
        for (what, c) in [
            ("the restarted controller", &self.restart_config),
            ("every restarted controller", &self.restart_all_config),
        ] {
            let (full, resumed) = c.per_proxy();
            println!(
                "config stream after the restart, {what}: {:.0} proxies said what they held and were sent {:.0} B each ({:.0} B in all); {:.0} said nothing and were sent the whole state, {:.0} B each ({:.2e} of it per proxy)",
                c.resumed.0,
                resumed,
                c.resumed.1,
                c.full.0,
                full,
                resumed / full.max(1.0)
            );
        }
    }

    pub fn figures(&self) -> Figures {
        let remotes = (self.size.clusters - 1) as f64;
        let mut f = Figures::new("clusterset");
        let s = &self.size;
        let size = BTreeMap::from([
            ("clusters", s.clusters as f64),
            ("services", s.services as f64),
            ("endpoints_per_cluster", s.endpoints as f64),
            ("churn_per_s", s.churn),
            ("sidecars_per_cluster", s.sidecars as f64),
            ("sidecar_scope_namespaces", s.sidecar_scope.len() as f64),
        ]);
        for (k, v) in size {
            f.add(&format!("size.{k}"), v, "count");
        }
        if let Some(ms) = s.batch_window_ms {
            f.add("size.batch_window", ms as f64, "ms");
        }
        f.add("size.policies", s.policies as f64, "count");
        f.add(
            "size.sidecar_scope_authorized",
            if s.sidecar_scope_authorized { 1.0 } else { 0.0 },
            "bool",
        );
        let p = &self.policies;
        for (name, d) in [
            ("policy_to_ack", &p.to_ack),
            ("policy_edit_to_ack", &p.edit_to_ack),
            ("policy_to_scoped_out", &p.to_scoped_out),
            ("policy_deleted_to_scoped_in", &p.to_scoped_in),
        ] {
            if !d.is_empty() {
                f.add(&format!("{name}.p50"), ms(pct(d, 0.5)), "ms");
                f.add(&format!("{name}.p99"), ms(pct(d, 0.99)), "ms");
                f.add(&format!("{name}.max"), ms(d.last().copied().unwrap_or_default()), "ms");
            }
        }
        if s.policies > 0 {
            f.add("policy_round.controller_cpu", p.controller_cpu / s.policies as f64, "s");
        }
        if p.edit_watched > 0 {
            f.add("policy_edit_regained", p.edit_regained as f64, "count");
            f.add("policy_edit_watched", p.edit_watched as f64, "count");
        }
        let d = &self.delays;
        f.add("change_to_ack.p50", ms(pct(d, 0.5)), "ms");
        f.add("change_to_ack.p99", ms(pct(d, 0.99)), "ms");
        f.add("change_to_ack.max", ms(d.last().copied().unwrap_or_default()), "ms");
        f.add("change_to_ack.missing", self.missing as f64, "deliveries");
        let rss = &self.controller_rss_mib;
        let cpu = &self.controller_cpu;
        f.add("controller.rss_mean", mean(rss), "MiB");
        f.add("controller.rss_max", max(rss), "MiB");
        f.add("controller.rss_per_remote_cluster", mean(rss) / remotes, "MiB");
        f.add("controller.cpu_mean", mean(cpu) * 100.0, "% of a core");
        f.add(
            "controller.cpu_per_remote_cluster",
            mean(cpu) * 100.0 / remotes,
            "% of a core",
        );
        f.add("sidecar.cpu_mean", self.sidecar_cpu * 100.0, "% of a core");
        f.add("gateway.cpu_mean", self.gateway_cpu * 100.0, "% of a core");
        f.add("peering.bytes_per_pair", self.peering_bytes_per_pair, "B/s");
        f.add("peering.services_patched", self.peering_services.patched, "services");
        f.add("peering.services_whole", self.peering_services.whole, "services");
        f.add("sidecar.rss_mean", mean(&self.sidecar_rss_mib), "MiB");
        f.add("sidecar.rss_max", max(&self.sidecar_rss_mib), "MiB");
        f.add("sidecar.heap_allocated_mean", mean(&self.sidecar_heap_mib), "MiB");
        f.add(
            "sidecar.rss_after_restart_mean",
            mean(&self.sidecar_rss_after_restart_mib),
            "MiB",
        );
        f.add(
            "sidecar.rss_after_restart_max",
            max(&self.sidecar_rss_after_restart_mib),
            "MiB",
        );
        f.add("sidecar.peak_rss_max", max(&self.sidecar_peak_rss_mib), "MiB");
        f.add(
            "sidecar.endpoints_wrong",
            self.sidecar_endpoints_wrong.iter().sum::<usize>() as f64,
            "endpoints",
        );
        f.add("initial_sync", self.initial_sync.as_secs_f64(), "s");
        let g = &self.gateway_restart;
        f.add("gateway_restart.started", g.started.as_secs_f64(), "s");
        f.add("gateway_restart.ready", g.ready.as_secs_f64(), "s");
        f.add("gateway_restart.first_back", g.first_back.as_secs_f64(), "s");
        f.add("gateway_restart.back", g.back.as_secs_f64(), "s");
        f.add("gateway_restart.peering_bytes", g.sent.bytes, "B");
        f.add("gateway_restart.window", g.window.as_secs_f64(), "s");
        f.add("gateway_restart.full_bytes", g.sent.full_bytes, "B");
        f.add("gateway_restart.resumed_updates", g.sent.resumed.0, "updates");
        f.add("gateway_restart.resumed_bytes", g.sent.resumed.1, "B");
        f.ratio(
            "gateway_restart.extra_bytes_over_exports_to_one_cluster",
            self.gateway_restart_extra() / self.exports_to_one_cluster().max(1.0),
            Some(1.0),
        );
        f.add("restart.resync", self.restart_resync.as_secs_f64(), "s");
        f.add("restart.peering_bytes_10s", self.restart_peering.bytes, "B");
        f.add("restart.peering_full_bytes_10s", self.restart_peering.full_bytes, "B");
        f.add(
            "restart.peering_resumed_updates",
            self.restart_peering.resumed.0,
            "updates",
        );
        f.add("quiet.peering_bytes_10s", self.quiet_bytes, "B");
        f.add("restart_all.resync", self.restart_all_resync.as_secs_f64(), "s");
        f.add("restart_all.peering_bytes_10s", self.restart_all_peering.bytes, "B");
        f.add(
            "restart_all.peering_full_bytes_10s",
            self.restart_all_peering.full_bytes,
            "B",
        );
        f.add(
            "restart_all.peering_resumed_updates",
            self.restart_all_peering.resumed.0,
            "updates",
        );
        f.ratio(
            "restart_all.extra_bytes_over_initial_sync",
            self.restart_all_extra() / self.initial_sync_bytes.max(1.0),
            Some(1.0),
        );
        f.add("initial_sync.peering_bytes", self.initial_sync_bytes, "B");
        f.add("sidecar.held_bytes_mean", mean(&self.sidecar_held_bytes), "B");
        for (key, c) in [
            ("restart", &self.restart_config),
            ("restart_all", &self.restart_all_config),
        ] {
            let (full, resumed) = c.per_proxy();
            f.add(&format!("{key}.config_resumed_proxies"), c.resumed.0, "proxies");
            f.add(&format!("{key}.config_resumed_bytes_per_proxy"), resumed, "B");
            f.add(&format!("{key}.config_full_bytes_per_proxy"), full, "B");
            f.ratio(
                &format!("{key}.config_resumed_over_full"),
                resumed / full.max(1.0),
                None,
            );
        }
        f.ratio(
            "restart.extra_bytes_over_initial_sync",
            self.restart_extra() / self.initial_sync_bytes.max(1.0),
            Some(1.0),
        );
        f
    }

    /// What a controller's restart sent beyond quiet traffic: its peers' exports to it and its
    /// own to them (about 2/N of the first sync). A resync storm would be the whole first sync
    /// again, or more.
    pub fn restart_extra(&self) -> f64 {
        not_below_zero(self.restart_peering.bytes - self.quiet_bytes)
    }

    /// What a gateway's restart sent beyond quiet traffic (scaled to its window).
    pub fn gateway_restart_extra(&self) -> f64 {
        let g = &self.gateway_restart;
        let quiet = self.quiet_bytes * g.window.as_secs_f64() / RESTART_WINDOW.as_secs_f64();
        not_below_zero(g.sent.bytes - quiet)
    }

    /// Every peer's exports to one cluster: the first sync's share of one receiver (what its
    /// peers resent it after its gateway restarted, before they were told what it held).
    pub fn exports_to_one_cluster(&self) -> f64 {
        self.initial_sync_bytes / self.size.clusters.max(1) as f64
    }

    /// What restarting every controller sent beyond quiet traffic: each cluster's exports to
    /// each peer once is the first sync again (1.0); a storm would be more.
    pub fn restart_all_extra(&self) -> f64 {
        not_below_zero(self.restart_all_peering.bytes - self.quiet_bytes)
    }

    /// The p-th percentile of change -> delivery.
    pub fn delay(&self, p: f64) -> Duration {
        pct(&self.delays, p)
    }
}
