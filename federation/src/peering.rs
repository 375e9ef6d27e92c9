//! Controller-to-controller peering, through the east-west gateways.
//!
//! Each controller dials every peer's gateway, asks for the peer's federation service, runs
//! mTLS with the peer controller inside the tunnel, and streams its exports: first in full,
//! then as changes, renewing its lease in between. The receiving side keeps each peer's
//! exports until the lease runs out; a silent cluster's endpoints then expire everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::catalog::{Changes, Key, Services, Touched};
use crate::xds::Update;
use futures::Stream;
use serde::Serialize;
use strait_api::pb;
use strait_api::pb::peering_service_client::PeeringServiceClient;
use strait_api::pb::peering_service_server::PeeringService;
use strait_api::transport::PeerInfo;
use strait_gateway::TunnelClient;
use strait_trust::{CertStore, PeerPolicy, SpiffeId};
use tokio::sync::{watch, Notify};
use tonic::{Request, Response, Status, Streaming};

/// What this controller knows of one peer cluster.
#[derive(Clone, Debug)]
pub struct PeerState {
    pub cluster: String,
    pub region: String,
    pub gateway: Option<pb::Gateway>,
    /// Shared with the merge loop's snapshot (copied only when an update lands while a merge
    /// holds the previous one).
    pub services: Arc<Services>,
    /// The peer's clusterset routes and policies. Kept when its lease runs out: a cluster cut
    /// off from a peer keeps enforcing the last copies it got.
    pub objects: Arc<Vec<pb::PolicyObject>>,
    /// How the peer enforces every object it holds.
    pub statuses: Arc<Vec<pb::ObjectStatus>>,
    /// The peer's last traffic summary (for the clusterset page; stale once the lease ran out).
    pub traffic: Option<Arc<pb::TrafficSummary>>,
    pub expires_at: Instant,
    /// The lease its last update gave.
    pub lease: Duration,
    pub last_renewed: SystemTime,
    pub connected: bool,
}

impl PeerState {
    pub fn alive(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

/// A peer as `strait status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub name: String,
    pub region: String,
    pub connected: bool,
    pub lease_valid: bool,
    pub last_renewed_unix_ms: i64,
    pub lease_expires_in_ms: i64,
    pub exported_services: usize,
    pub gateway: String,
}

/// All peers' exports, shared by the peering server, the merge and the status view.
#[derive(Clone, Default)]
pub struct PeerTable {
    peers: Arc<Mutex<BTreeMap<String, PeerState>>>,
    /// Which services each peer's updates touched since the merge last took them
    /// ([`PeerTable::take_changes`]).
    changes: Arc<Mutex<Changes>>,
    changed: Arc<Notify>,
}

impl PeerTable {
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Applies one update from a peer and renews its lease. Takes the update: its services
    /// move into the table instead of being copied (about 130 endpoints each at the published
    /// size, several strings apiece). `Err` lists the patches refused (made against another
    /// version than the one held, or of a service not held): those services stay as they
    /// were, everything else in the update is applied.
    pub fn apply(&self, update: pb::ExportUpdate, now: Instant) -> Result<(), String> {
        let Ok(mut peers) = self.peers.lock() else {
            return Ok(());
        };
        let lease = Duration::from_millis(update.lease_ms.clamp(1_000, 300_000));
        let entry = peers.entry(update.cluster.clone()).or_insert_with(|| PeerState {
            cluster: update.cluster.clone(),
            region: update.region.clone(),
            gateway: None,
            services: Arc::default(),
            objects: Arc::default(),
            statuses: Arc::default(),
            traffic: None,
            expires_at: now,
            lease,
            last_renewed: SystemTime::now(),
            connected: true,
        });
        let was_alive = entry.alive(now);
        let mut touched = Touched::default();
        if update.full {
            entry.services = Arc::default();
            touched = Touched::All;
        }
        let names_services = !update.upserts.is_empty() || !update.patches.is_empty() || !update.removed.is_empty();
        let mut content_changed = update.full || names_services || !was_alive;
        let mut refused = vec![];
        if update.objects_included && *entry.objects != update.objects {
            entry.objects = Arc::new(update.objects);
            content_changed = true;
        }
        // Traffic changes every few seconds and never changes what proxies are told.
        if update.traffic_included {
            entry.traffic = update.traffic.map(Arc::new);
        }
        if update.statuses_included && *entry.statuses != update.statuses {
            entry.statuses = Arc::new(update.statuses);
            content_changed = true;
        }
        // Changed in place, and only when the update names services (a renewal leaves the map
        // alone): the merge holds no peer's map between passes, so this copies nothing (during
        // a pass, the one copy the pass's snapshot forces); it learns what changed from
        // `changes`.
        if names_services {
            let services = Arc::make_mut(&mut entry.services);
            let mut keys = BTreeSet::new();
            for svc in update.upserts {
                let key: Key = format!("{}/{}", svc.namespace, svc.name).into();
                keys.insert(key.clone());
                services.insert(key, Arc::new(svc));
            }
            for mut patch in update.patches {
                let name = std::mem::take(&mut patch.key);
                let result = match services.get_mut(name.as_str()) {
                    Some(held) => apply_patch(held, patch),
                    None => Err("not held".to_string()),
                };
                match result {
                    Ok(()) => _ = keys.insert(name.into()),
                    Err(e) => refused.push(format!("{name}: {e}")),
                }
            }
            for key in &update.removed {
                if let Some((key, _)) = services.remove_entry(key.as_str()) {
                    keys.insert(key);
                }
            }
            touched.add(Touched::Keys(keys));
        }
        if touched != Touched::default() {
            // A poisoned lock still holds every change before the panic: none is dropped.
            let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
            changes.entry(update.cluster.clone()).or_default().add(touched);
        }
        if update.gateway.is_some() {
            entry.gateway = update.gateway;
        }
        entry.region = update.region;
        entry.expires_at = now + lease;
        entry.lease = lease;
        entry.last_renewed = SystemTime::now();
        entry.connected = true;
        drop(peers);
        if content_changed {
            self.changed.notify_one();
        }
        match refused.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "patches refused, those services kept as held: {}",
                refused.join("; ")
            )),
        }
    }

    /// What this controller holds of `cluster`'s exports, each with its [`export_digest`]
    /// (nothing for a cluster it never heard from): the first message of a stream whose sender
    /// asked, so it sends only what differs. Empty above [`HELD_MAX`] services: the sender then
    /// sends every export, as on a first connect.
    pub fn held(&self, cluster: &str) -> Vec<pb::Held> {
        let services = self
            .peers
            .lock()
            .ok()
            .and_then(|p| p.get(cluster).map(|p| p.services.clone()))
            .unwrap_or_default();
        if services.len() > HELD_MAX {
            return vec![];
        }
        services
            .iter()
            .map(|(key, svc)| pb::Held {
                name: key.to_string(),
                version: export_digest(svc),
            })
            .collect()
    }

    /// Marks `cluster`, just read from the state directory ([`crate::peerlog`]), as last heard
    /// from at `written`, `age` before `now`: its lease runs that much shorter (a peer heard from
    /// longer ago than its lease is held, and asked to resume against, but not alive), and it
    /// is not connected. Returns the number of services it exports.
    pub fn restored(&self, cluster: &str, written: SystemTime, age: Duration, now: Instant) -> Option<usize> {
        let mut peers = self.peers.lock().ok()?;
        let peer = peers.get_mut(cluster)?;
        peer.expires_at = now + peer.lease.saturating_sub(age);
        peer.last_renewed = written;
        peer.connected = false;
        Some(peer.services.len())
    }

    /// Everything held of `cluster`, encoded as a state file's records
    /// ([`crate::peerlog::whole_state_records`]), and when it was last heard from; `None` for
    /// a cluster never heard from.
    pub fn whole_state(&self, cluster: &str) -> Option<(Vec<u8>, SystemTime)> {
        // Cloned under the lock (shared maps and lists, the few strings), encoded after it.
        let peer = self.peers.lock().ok()?.get(cluster)?.clone();
        let records = crate::peerlog::whole_state_records(
            &peer.cluster,
            &peer.region,
            peer.lease.as_millis() as u64,
            peer.gateway.as_ref(),
            &peer.objects,
            &peer.statuses,
            &peer.services,
        );
        Some((records, peer.last_renewed))
    }

    pub fn disconnected(&self, cluster: &str) {
        if let Ok(mut peers) = self.peers.lock() {
            if let Some(p) = peers.get_mut(cluster) {
                p.connected = false;
            }
        }
    }

    /// Which services each peer's updates touched since the last call. Taken right before
    /// [`PeerTable::snapshot`] with no wait between, so the snapshot holds every change taken.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn snapshot(&self) -> Vec<PeerState> {
        self.peers
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The earliest lease expiry still in the future (the merge must rerun then).
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.peers
            .lock()
            .ok()?
            .values()
            .map(|p| p.expires_at)
            .filter(|t| *t > now)
            .min()
    }

    pub fn views(&self, configured: &[String]) -> Vec<PeerView> {
        let now = Instant::now();
        let peers = self.snapshot();
        let mut out: Vec<PeerView> = peers
            .iter()
            .map(|p| PeerView {
                name: p.cluster.clone(),
                region: p.region.clone(),
                connected: p.connected && p.alive(now),
                lease_valid: p.alive(now),
                last_renewed_unix_ms: strait_api::unix_ms(p.last_renewed),
                lease_expires_in_ms: if p.alive(now) {
                    (p.expires_at - now).as_millis() as i64
                } else {
                    -((now - p.expires_at).as_millis() as i64)
                },
                exported_services: p.services.len(),
                gateway: p.gateway.as_ref().map(|g| g.address.clone()).unwrap_or_default(),
            })
            .collect();
        for name in configured {
            if !out.iter().any(|v| &v.name == name) {
                out.push(PeerView {
                    name: name.clone(),
                    region: String::new(),
                    connected: false,
                    lease_valid: false,
                    last_renewed_unix_ms: 0,
                    lease_expires_in_ms: 0,
                    exported_services: 0,
                    gateway: String::new(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The most services a receiver lists in its `held` answer (about 30 bytes each: 1.5 MB, under
/// gRPC's 4 MiB message limit).
const HELD_MAX: usize = 50_000;

/// The request header a sender names its cluster in, asking what the receiver holds of it.
const CLUSTER_HEADER: &str = "strait-cluster";
/// The response header of a receiver that answers with what it holds (`ExportAck.held`) first.
const HELD_HEADER: &str = "strait-held";
/// The response header of a receiver that applies `ExportUpdate.patches` (a sender sends a
/// receiver of an older build, which would ignore them, whole services only).
const PATCHES_HEADER: &str = "strait-patches";

/// The patch that turns `old`, held by a receiver under `key`, into `new`: `Some` when they
/// differ in their endpoints alone and the patch carries at most half of `new`'s endpoints,
/// so that it is the smaller message. Past the endpoints both lists start and end with, the
/// rest is one endpoint taken out and one put in at the other end (an endpoint replaced by
/// one that sorts elsewhere), or runs of endpoints changed in place (each changed run sent: a
/// churned or readiness-flipped endpoint anywhere), or else one splice (an endpoint added or
/// removed anywhere, a range replaced). The receiver's copy must come out exactly as `new`, whose
/// digest the next patch is made against and a resumed stream compares.
pub fn patch(key: &str, old: &pb::ExportedService, new: &pb::ExportedService) -> Option<pb::ServicePatch> {
    // Every field named, so a field added to the message is considered here.
    let pb::ExportedService {
        name,
        namespace,
        ports,
        endpoints,
        exported_at_unix_ms,
        identities,
    } = new;
    let same_rest = *name == old.name
        && *namespace == old.namespace
        && *ports == old.ports
        && *exported_at_unix_ms == old.exported_at_unix_ms
        && *identities == old.identities;
    if !same_rest {
        return None;
    }
    let (a, b) = (&old.endpoints, endpoints);
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a_mid, b_mid) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    // Each splice as (where in the old middle, endpoints removed, the new middle's endpoints
    // put in their place).
    let mut spans: Vec<(usize, usize, std::ops::Range<usize>)> = vec![];
    let n = a_mid.len();
    if n >= 2 && n == b_mid.len() && a_mid[1..] == b_mid[..n - 1] {
        // The first taken out, one put in after the last: an endpoint replaced by one that
        // sorts further on (lists kept in address order).
        spans.extend([(0, 1, 0..0), (n, 0, n - 1..n)]);
    } else if n >= 2 && n == b_mid.len() && a_mid[..n - 1] == b_mid[1..] {
        spans.extend([(0, 0, 0..1), (n - 1, 1, n..n)]);
    } else if n == b_mid.len() {
        let mut i = 0;
        while i < n {
            let start = i;
            while i < n && a_mid[i] != b_mid[i] {
                i += 1;
            }
            if i > start {
                spans.push((start, i - start, start..i));
            }
            i += 1;
        }
    } else {
        spans.push((0, n, 0..b_mid.len()));
    }
    let sent: usize = spans.iter().map(|(_, _, inserted)| inserted.len()).sum();
    // A service left with no endpoints is smaller whole.
    if b.is_empty() || 2 * sent > b.len() {
        return None;
    }
    Some(pb::ServicePatch {
        key: key.to_string(),
        base: export_digest(old),
        splices: spans
            .into_iter()
            .map(|(at, removed, inserted)| pb::EndpointSplice {
                at: (prefix + at) as u32,
                removed: removed as u32,
                inserted: b_mid[inserted].to_vec(),
            })
            .collect(),
    })
}

/// Applies `patch` to the export held, or changes nothing and says why: held is not the
/// version the patch was made against, or its splices overlap, come out of order, or reach
/// past the endpoints held.
fn apply_patch(held: &mut Arc<pb::ExportedService>, patch: pb::ServicePatch) -> Result<(), String> {
    let version = export_digest(held);
    if version != patch.base {
        return Err(format!(
            "made against version {:016x}, version {version:016x} is held",
            patch.base
        ));
    }
    let len = held.endpoints.len();
    // Where the splice before ended, in the held list.
    let mut end = 0;
    for (n, s) in patch.splices.iter().enumerate() {
        let (at, removed) = (s.at as usize, s.removed as usize);
        if at < end || at + removed > len {
            return Err(format!(
                "splice {n} (at {at}, removing {removed}) overlaps the one before it or reaches past the {len} endpoints held"
            ));
        }
        end = at + removed;
    }
    let svc = Arc::make_mut(held);
    let mut old = std::mem::take(&mut svc.endpoints).into_iter();
    let mut pos = 0;
    for s in patch.splices {
        let (at, removed) = (s.at as usize, s.removed as usize);
        svc.endpoints.extend(old.by_ref().take(at - pos));
        old.by_ref().take(removed).for_each(drop);
        svc.endpoints.extend(s.inserted);
        pos = at + removed;
    }
    svc.endpoints.extend(old);
    Ok(())
}

/// A digest of an exported service's content, the same in every controller of this build:
/// what a receiver and a sender compare to resume a peering stream. An endpoint's labels are a
/// map whose encoding follows its iteration order (a hash map's, different in every process),
/// so they are digested in key order.
pub fn export_digest(svc: &pb::ExportedService) -> u64 {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    if svc.endpoints.iter().all(|e| e.labels.len() <= 1) {
        digest.update(prost::Message::encode_to_vec(svc));
    } else {
        let mut plain = svc.clone();
        plain.endpoints.iter_mut().for_each(|e| e.labels.clear());
        digest.update(prost::Message::encode_to_vec(&plain));
        for e in &svc.endpoints {
            let mut labels: Vec<_> = e.labels.iter().collect();
            labels.sort();
            digest.update((labels.len() as u64).to_le_bytes());
            for (k, v) in labels {
                for text in [k, v] {
                    digest.update((text.len() as u64).to_le_bytes());
                    digest.update(text.as_bytes());
                }
            }
        }
    }
    let digest: [u8; 32] = digest.finalize().into();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What to send a receiver that holds `held` (each export's name and [`export_digest`]) for it
/// to hold `current`: the services it lacks or holds otherwise, and the names it holds that
/// are no longer exported, in key order.
fn resumed_delta(current: &Services, held: &BTreeMap<String, u64>) -> (Vec<pb::ExportedService>, Vec<String>) {
    let upserts = current
        .iter()
        .filter(|(key, svc)| held.get(&***key) != Some(&export_digest(svc)))
        .map(|(_, svc)| (**svc).clone())
        .collect();
    let removed = held
        .keys()
        .filter(|name| !current.contains_key(name.as_str()))
        .cloned()
        .collect();
    (upserts, removed)
}

/// The receiving side of peering.
pub struct PeeringServer {
    pub table: PeerTable,
    pub own_cluster: String,
    /// Where each update received is kept too (`stateDir`), if anywhere.
    pub log: Option<crate::peerlog::PeerLog>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::ExportAck, Status>> + Send>>;

#[tonic::async_trait]
impl PeeringService for PeeringServer {
    type ExportStream = AckStream;

    async fn export(&self, req: Request<Streaming<pb::ExportUpdate>>) -> Result<Response<AckStream>, Status> {
        let identity = PeerInfo::of(&req)
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| Status::unauthenticated("peering needs a client certificate"))?;
        if identity.namespace() != Some(strait_api::SYSTEM_NAMESPACE)
            || identity.service_account() != Some(strait_api::FEDERATION_SA)
        {
            return Err(Status::permission_denied(format!(
                "{identity} is not a federation controller; only {}/{} may export to peers",
                strait_api::SYSTEM_NAMESPACE,
                strait_api::FEDERATION_SA
            )));
        }
        // A sender that names its cluster is told first what this controller holds of it.
        let named = req
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = req.into_inner();
        let table = self.table.clone();
        let own = self.own_cluster.clone();
        let log = self.log.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let answers_held = named.is_some();
        if let Some(name) = &named {
            // Hashing every export held of the peer (about 0.4 MB at the published size) is
            // work for a blocking thread, not for the runtime's workers.
            let (held_table, held_name) = (table.clone(), name.clone());
            let held = tokio::task::spawn_blocking(move || held_table.held(&held_name))
                .await
                .map_err(|e| Status::internal(format!("digesting what is held of {name}: {e}")))?;
            tracing::info!(peer = %name, held = held.len(), "peer resuming; told what this controller holds of it");
            let _ = tx
                .send(Ok(pb::ExportAck {
                    generation: 0,
                    held_included: true,
                    held,
                }))
                .await;
        }
        tokio::spawn(async move {
            let mut cluster = None;
            let mut acked: Option<Instant> = None;
            while let Ok(Some(mut update)) = inbound.message().await {
                let invalid = if update.cluster.is_empty() || update.cluster == own {
                    Some(format!(
                        "peer announced cluster name {:?}; it must be set and differ from this cluster's ({own})",
                        update.cluster
                    ))
                } else {
                    named.as_ref().filter(|n| **n != update.cluster).map(|name| {
                        format!(
                            "peer named cluster {name:?} in its {CLUSTER_HEADER} header but exports as {:?}; they must be the same",
                            update.cluster
                        )
                    })
                };
                if let Some(message) = invalid {
                    let _ = tx.send(Err(Status::invalid_argument(message))).await;
                    return;
                }
                if cluster.is_none() {
                    tracing::info!(peer = %update.cluster, %identity, "peer connected");
                }
                cluster = Some(update.cluster.clone());
                let generation = update.generation;
                let now = Instant::now();
                let record = log.as_ref().map(|_| crate::peerlog::PeerLog::record(&mut update));
                let applied = table.apply(update, now);
                if let (Some(log), Some(record), Some(c)) = (&log, record, &cluster) {
                    log.append(c, record).await;
                }
                // Held otherwise than the sender thinks: the stream ends, so that the sender
                // reconnects, is told what is held, and sends those services whole.
                if let Err(e) = applied {
                    tracing::warn!(peer = ?cluster, error = %e, "ending the peer's stream to resync");
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "{e}; reconnect to send them whole"
                        ))))
                        .await;
                    break;
                }
                // Acknowledged at most every ACK_EVERY (the sender reads acknowledgements only
                // to see the stream is alive): one per update was a message back through the
                // tunnel for every change received.
                if acked.is_some_and(|at| now.duration_since(at) < ACK_EVERY) {
                    continue;
                }
                acked = Some(now);
                if tx
                    .send(Ok(pb::ExportAck {
                        generation,
                        ..Default::default()
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            if let Some(c) = cluster {
                tracing::info!(peer = %c, "peer stream ended; its exports stay until the lease expires");
                table.disconnected(&c);
            }
        });
        let mut response: Response<AckStream> =
            Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        if answers_held {
            response
                .metadata_mut()
                .insert(HELD_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        }
        response
            .metadata_mut()
            .insert(PATCHES_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        Ok(response)
    }
}

/// How often a peering stream's receiver acknowledges what it applied, at most.
const ACK_EVERY: Duration = Duration::from_secs(1);

/// This cluster's exports as peers see them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exports {
    /// Shared with the merge loop, and unchanged (the same `Arc`) until the catalog changes.
    pub services: Arc<Services>,
    /// What `services` changed against the exports before them, so that a sender that last
    /// sent those looks at the changed services alone instead of walking both maps (one walk
    /// here, not one per peer).
    pub change: Option<Arc<ExportChange>>,
    /// Clusterset routes and policies written here.
    pub objects: Vec<pb::PolicyObject>,
    /// How this cluster enforces every object it holds.
    pub statuses: Vec<pb::ObjectStatus>,
}

/// The services that differ between two exports: `from`, and the `services` of the [`Exports`]
/// holding this.
#[derive(Debug, PartialEq)]
pub struct ExportChange {
    pub from: Arc<Services>,
    /// Added, changed or removed, in key order ([`crate::catalog::changes`]).
    pub keys: Vec<crate::catalog::Key>,
    /// Of those changed, the ones a [`patch`] says (made here once, not once per peer).
    pub patches: BTreeMap<crate::catalog::Key, pb::ServicePatch>,
}

impl ExportChange {
    /// What `now` changed against `before`; `None` for nothing.
    pub fn between(before: &Arc<Services>, now: &Services) -> Option<Self> {
        let (mut keys, mut patches) = (vec![], BTreeMap::new());
        for (key, new) in crate::catalog::changes(before, now) {
            keys.push(key.clone());
            if let Some(p) = new.zip(before.get(key)).and_then(|(new, old)| patch(key, old, new)) {
                patches.insert(key.clone(), p);
            }
        }
        (!keys.is_empty()).then(|| ExportChange {
            from: before.clone(),
            keys,
            patches,
        })
    }
}

/// What to send a peer: services whole, patches, names removed.
type Delta = (Vec<pb::ExportedService>, Vec<pb::ServicePatch>, Vec<String>);

/// The services to send a peer that holds `sent`, against `current`, in key order: those added
/// or changed (as patches where the peer takes them and one says the change), and the names of
/// those removed. From `current.change` when it was made against `sent`, else by a walk over
/// both.
fn services_delta(sent: &Arc<Services>, current: &Exports, patches: bool) -> Delta {
    let (mut upserts, mut patched, mut removed) = (vec![], vec![], vec![]);
    let mut take =
        |k: &crate::catalog::Key, new: Option<&Arc<pb::ExportedService>>, p: Option<pb::ServicePatch>| match (new, p) {
            (Some(_), Some(p)) if patches => patched.push(p),
            (Some(s), _) => upserts.push((**s).clone()),
            (None, _) => removed.push(k.to_string()),
        };
    match current.change.as_deref().filter(|c| Arc::ptr_eq(&c.from, sent)) {
        Some(c) => c
            .keys
            .iter()
            .for_each(|k| take(k, current.services.get(k), c.patches.get(k).cloned())),
        None => crate::catalog::changes(sent, &current.services).for_each(|(k, new)| {
            let p = patches
                .then(|| new.zip(sent.get(k)).and_then(|(new, old)| patch(k, old, new)))
                .flatten();
            take(k, new, p)
        }),
    }
    (upserts, patched, removed)
}

/// The sending side: one task per configured peer.
pub struct PeerClient {
    pub peer: crate::config::Peer,
    pub cluster: String,
    pub region: String,
    pub lease: Duration,
    pub gateway: pb::Gateway,
    /// Opens the channel each stream to the peer runs on ([`peer_channel`]).
    pub dial: Dial,
    pub exports: watch::Receiver<Arc<Exports>>,
    /// This cluster's traffic summary, sent along when it changes.
    pub traffic: watch::Receiver<Arc<pb::TrafficSummary>>,
    pub metrics: PeeringMetrics,
}

/// What this controller sends each peer: updates and their encoded bytes (the peering
/// bandwidth, before TLS and QUIC framing), and the services in them, whole or patched.
#[derive(Clone)]
pub struct PeeringMetrics {
    updates: prometheus::IntCounterVec,
    bytes: prometheus::IntCounterVec,
    services: prometheus::IntCounterVec,
}

impl PeeringMetrics {
    pub fn new(registry: &prometheus::Registry) -> anyhow::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<prometheus::IntCounterVec> {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(PeeringMetrics {
            updates: counter(
                "strait_peering_updates_sent_total",
                "Export updates sent to each peer cluster, by update: full (every export), resumed (the first to a peer that said what it held: what differs) or change (deltas and lease renewals)",
                &["peer", "update"],
            )?,
            bytes: counter(
                "strait_peering_sent_bytes_total",
                "Encoded bytes of the export updates sent to each peer cluster, by update (full, resumed or change)",
                &["peer", "update"],
            )?,
            services: counter(
                "strait_peering_services_sent_total",
                "Exported services sent to each peer cluster, by how: whole, or patch (the endpoints that changed, to a peer holding the service)",
                &["peer", "as"],
            )?,
        })
    }
}

/// Opens a gRPC channel to a peer cluster's controller: [`peer_channel`], called again for
/// each stream (a stream that ended, or broke, is followed by a new connection).
pub type Dial = Arc<dyn Fn() -> Result<tonic::transport::Channel, anyhow::Error> + Send + Sync>;

/// A gRPC channel to a peer cluster's controller: a tunnel stream through its east-west
/// gateway (`gateway`), then mutual TLS with this controller's certificate, the peer checked
/// by the controllers' SPIFFE ID. `cluster` is this cluster, for the gateway's records.
pub fn peer_channel(
    store: &CertStore,
    tunnel: &TunnelClient,
    gateway: std::net::SocketAddr,
    cluster: &str,
) -> Result<tonic::transport::Channel, anyhow::Error> {
    let td = store.id().trust_domain().clone();
    let gateway_id = SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::GATEWAY_SA)?;
    let controller_id = SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::FEDERATION_SA)?;
    let tls = Arc::new(strait_trust::client_config(
        Some(store),
        store.bundle(),
        store.metrics(),
        PeerPolicy::OneOf(vec![controller_id]),
        &[strait_trust::ALPN_H2],
    )?);
    let tunnel = tunnel.clone();
    let cluster = cluster.to_string();
    Ok(strait_api::transport::channel_with(move || {
        let tunnel = tunnel.clone();
        let tls = tls.clone();
        let gateway_id = gateway_id.clone();
        let cluster = cluster.clone();
        async move {
            let req = pb::TunnelRequest {
                service: strait_api::FEDERATION_SERVICE.into(),
                namespace: strait_api::SYSTEM_NAMESPACE.into(),
                port: crate::FEDERATION_PORT as u32,
                source_cluster: cluster,
                ..Default::default()
            };
            let (stream, _) = tunnel
                .open(gateway, &gateway_id, &req)
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))?;
            tokio_rustls::TlsConnector::from(tls)
                .connect(strait_api::transport::mesh_server_name(), stream)
                .await
        }
    }))
}

impl PeerClient {
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => tracing::info!(peer = %self.peer.name, "peering stream closed"),
                Err(e) => tracing::debug!(peer = %self.peer.name, error = %e, "peering stream failed; retrying"),
            }
            // A stream that served a while broke (its peer's gateway or controller restarted,
            // a reset says so as soon as the new one hears from this end): dial again at once,
            // then back off from 200 ms, doubling.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
                continue;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self) -> Result<(), anyhow::Error> {
        let mut client = PeeringServiceClient::new((self.dial)()?);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut exports = self.exports.clone();
        let mut traffic = self.traffic.clone();
        let base = pb::ExportUpdate {
            cluster: self.cluster.clone(),
            region: self.region.clone(),
            lease_ms: self.lease.as_millis() as u64,
            gateway: Some(self.gateway.clone()),
            ..Default::default()
        };
        let renew_every = self.lease / 3;
        let metrics = self.metrics.clone();
        // What the peer says it holds of this cluster (its first answer), or `None` when it says
        // nothing (the first update is then every export); and whether it applies patches.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<(Option<BTreeMap<String, u64>>, bool)>();
        let peer = self.peer.name.clone();
        let sender = tokio::spawn(async move {
            let Ok((held, patches)) = held_rx.await else { return };
            // What the peer holds: the exports last sent, shared with the watch (never copied).
            let mut sent: Arc<Exports> = Arc::default();
            let mut sent_objects: Option<Vec<pb::PolicyObject>> = None;
            let mut sent_statuses: Option<Vec<pb::ObjectStatus>> = None;
            let mut sent_traffic_at = 0i64;
            let mut generation = 0u64;
            let mut first = true;
            loop {
                let current = exports.borrow_and_update().clone();
                let mut update = base.clone();
                generation += 1;
                update.generation = generation;
                let mut kind = Update::Change;
                if first {
                    match &held {
                        // A receiver that still holds exports of this cluster (a stream that
                        // broke, a gateway that restarted, this controller restarted within the
                        // lease) is sent what differs from them.
                        Some(held) if !held.is_empty() => {
                            kind = Update::Resumed;
                            (update.upserts, update.removed) = resumed_delta(&current.services, held);
                            tracing::info!(
                                %peer,
                                held = held.len(),
                                upserts = update.upserts.len(),
                                removed = update.removed.len(),
                                exports = current.services.len(),
                                "peering resumed: sent what differs from what the peer holds"
                            );
                        }
                        _ => {
                            kind = Update::Full;
                            update.full = true;
                            update.upserts = current.services.values().map(|s| (**s).clone()).collect();
                        }
                    }
                    first = false;
                } else if !Arc::ptr_eq(&current.services, &sent.services) {
                    (update.upserts, update.patches, update.removed) =
                        services_delta(&sent.services, &current, patches);
                }
                sent = current.clone();
                if sent_objects.as_ref() != Some(&current.objects) {
                    update.objects_included = true;
                    update.objects = current.objects.clone();
                    sent_objects = Some(current.objects.clone());
                }
                if sent_statuses.as_ref() != Some(&current.statuses) {
                    update.statuses_included = true;
                    update.statuses = current.statuses.clone();
                    sent_statuses = Some(current.statuses.clone());
                }
                let summary = traffic.borrow_and_update().clone();
                if summary.at_unix_ms != sent_traffic_at {
                    update.traffic_included = true;
                    update.traffic = Some((*summary).clone());
                    sent_traffic_at = summary.at_unix_ms;
                }
                metrics.updates.with_label_values(&[peer.as_str(), kind.label()]).inc();
                for (how, n) in [("whole", update.upserts.len()), ("patch", update.patches.len())] {
                    if n > 0 {
                        metrics
                            .services
                            .with_label_values(&[peer.as_str(), how])
                            .inc_by(n as u64);
                    }
                }
                metrics
                    .bytes
                    .with_label_values(&[peer.as_str(), kind.label()])
                    .inc_by(prost::Message::encoded_len(&update) as u64);
                if tx.send(update).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = exports.changed() => if r.is_err() { return },
                    r = traffic.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(renew_every) => {}
                }
            }
        });
        let result = async {
            let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request.metadata_mut().insert(
                CLUSTER_HEADER,
                self.cluster
                    .parse()
                    .map_err(|e| anyhow::anyhow!("cluster name {:?} as a header: {e}", self.cluster))?,
            );
            let response = client.export(request).await?;
            let answers_held = response.metadata().get(HELD_HEADER).is_some();
            let patches = response.metadata().get(PATCHES_HEADER).is_some();
            let mut acks = response.into_inner();
            // A receiver of an older build says nothing of what it holds.
            let held = match answers_held {
                true => match acks.message().await? {
                    Some(first) if first.held_included => {
                        Some(first.held.into_iter().map(|h| (h.name, h.version)).collect())
                    }
                    Some(_) => None,
                    None => return Ok(()),
                },
                false => None,
            };
            let _ = held_tx.send((held, patches));
            tracing::info!(peer = %self.peer.name, "exporting to peer");
            while acks.message().await?.is_some() {}
            Ok::<_, anyhow::Error>(())
        }
        .await;
        sender.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_takes_the_changed_services_from_the_exports_or_walks_when_behind() {
        let svc = |name: &str, at: u32| {
            Arc::new(pb::ExportedService {
                name: name.into(),
                namespace: "demo".into(),
                endpoints: vec![pb::Endpoint {
                    address: format!("127.0.0.1:{at}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let services = |list: &[(&str, &Arc<pb::ExportedService>)]| -> Arc<Services> {
            Arc::new(list.iter().map(|(k, s)| (Key::from(*k), (*s).clone())).collect())
        };
        let (a, b, c) = (svc("a", 1), svc("b", 2), svc("c", 3));
        let older = services(&[("demo/a", &a)]);
        let before = services(&[("demo/a", &a), ("demo/b", &b), ("demo/c", &c)]);
        let b2 = svc("b", 20);
        let d = svc("d", 4);
        let now = services(&[("demo/a", &a), ("demo/b", &b2), ("demo/d", &d)]);
        let change = ExportChange::between(&before, &now).unwrap();
        assert_eq!(
            change.keys,
            vec![Key::from("demo/b"), Key::from("demo/c"), Key::from("demo/d")]
        );
        assert!(ExportChange::between(&now, &now.as_ref().clone()).is_none());
        let exports = Exports {
            services: now.clone(),
            change: Some(Arc::new(change)),
            ..Default::default()
        };
        // Services of one endpoint are never patched (a patch of their one endpoint is no
        // smaller).
        let names = |(up, patched, gone): Delta| {
            assert!(patched.is_empty());
            let up: Vec<String> = up
                .iter()
                .map(|s| format!("{}@{}", s.name, s.endpoints[0].address))
                .collect();
            (up, gone)
        };
        let expected = (
            vec!["b@127.0.0.1:20".to_string(), "d@127.0.0.1:4".into()],
            vec!["demo/c".to_string()],
        );
        // A sender that sent `before`: the change's keys.
        assert_eq!(names(services_delta(&before, &exports, true)), expected);
        // The same services in another allocation: a walk, the same answer.
        let copy = Arc::new(before.as_ref().clone());
        assert_eq!(names(services_delta(&copy, &exports, true)), expected);
        // A sender further behind: a walk against what it sent.
        assert_eq!(
            names(services_delta(&older, &exports, true)),
            (vec!["b@127.0.0.1:20".to_string(), "d@127.0.0.1:4".into()], vec![])
        );
        // The keys are what a sender at `from` looks at (a change naming one service sends one).
        let partial = Exports {
            change: Some(Arc::new(ExportChange {
                from: before.clone(),
                keys: vec![Key::from("demo/d")],
                patches: BTreeMap::new(),
            })),
            ..exports.clone()
        };
        assert_eq!(
            names(services_delta(&before, &partial, true)),
            (vec!["d@127.0.0.1:4".to_string()], vec![])
        );
    }

    #[test]
    fn a_peer_that_says_what_it_holds_is_sent_what_differs_and_ends_with_the_exports() {
        let svc = |name: &str, port: u32| pb::ExportedService {
            name: name.into(),
            namespace: "demo".into(),
            endpoints: vec![pb::Endpoint {
                address: format!("127.0.0.1:{port}"),
                ..Default::default()
            }],
            exported_at_unix_ms: 7,
            ..Default::default()
        };
        // Labels are a hash map: two maps of the same labels, filled in opposite orders,
        // iterate (and encode) in orders of their own, but digest alike.
        let labels: Vec<(String, String)> = (0..16).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        let labelled = |order: &mut dyn Iterator<Item = &(String, String)>| {
            let mut a = svc("a", 1);
            a.endpoints[0].labels = order.cloned().collect();
            a
        };
        let a = labelled(&mut labels.iter());
        let a_again = labelled(&mut labels.iter().rev());
        assert_eq!(export_digest(&a), export_digest(&a_again));
        let mut a_other = a.clone();
        a_other.endpoints[0].labels.insert("k3".into(), "w3".into());
        assert_ne!(export_digest(&a), export_digest(&a_other), "a label's value");
        let mut a_later = a.clone();
        a_later.exported_at_unix_ms = 8;
        assert_ne!(export_digest(&a), export_digest(&a_later), "when it was exported");

        // West's controller sent everything once; then its stream broke. Meanwhile b moved, c
        // went away, d came; a is the same (its labels in another map).
        let table = PeerTable::default();
        let t0 = Instant::now();
        table
            .apply(
                pb::ExportUpdate {
                    cluster: "west".into(),
                    lease_ms: 10_000,
                    full: true,
                    upserts: vec![a.clone(), svc("b", 2), svc("c", 3)],
                    ..Default::default()
                },
                t0,
            )
            .expect("applied");
        table.take_changes();
        assert!(
            table.held("east").is_empty(),
            "nothing held of a cluster never heard from"
        );
        let held: BTreeMap<String, u64> = table.held("west").into_iter().map(|h| (h.name, h.version)).collect();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["demo/a", "demo/b", "demo/c"]);
        let current: Services = [a_again, svc("b", 20), svc("d", 4)]
            .into_iter()
            .map(|s| (Key::from(format!("demo/{}", s.name)), Arc::new(s)))
            .collect();
        let (upserts, removed) = resumed_delta(&current, &held);
        let names: Vec<&str> = upserts.iter().map(|s| s.name.as_str()).collect();
        assert_eq!((names, removed.clone()), (vec!["b", "d"], vec!["demo/c".to_string()]));
        // Applied as the new stream's first update, the receiver holds what west exports, and
        // the merge is told exactly which services moved.
        table
            .apply(
                pb::ExportUpdate {
                    cluster: "west".into(),
                    lease_ms: 10_000,
                    upserts,
                    removed,
                    ..Default::default()
                },
                t0 + Duration::from_secs(1),
            )
            .expect("applied");
        let held_now = &table.snapshot()[0].services;
        assert_eq!(**held_now, current);
        let touched = Touched::Keys(["demo/b", "demo/c", "demo/d"].into_iter().map(Key::from).collect());
        assert_eq!(table.take_changes(), Changes::from([("west".to_string(), touched)]));
        // Nothing differs: nothing is sent.
        let held: BTreeMap<String, u64> = table.held("west").into_iter().map(|h| (h.name, h.version)).collect();
        assert_eq!(resumed_delta(&current, &held), (vec![], vec![]));
    }

    #[test]
    fn lease_expires_and_full_update_replaces() {
        let table = PeerTable::default();
        let t0 = Instant::now();
        let svc = |name: &str| pb::ExportedService {
            name: name.into(),
            namespace: "demo".into(),
            ..Default::default()
        };
        table
            .apply(
                pb::ExportUpdate {
                    cluster: "west".into(),
                    lease_ms: 2_000,
                    full: true,
                    upserts: vec![svc("a"), svc("b")],
                    ..Default::default()
                },
                t0,
            )
            .expect("applied");
        let p = &table.snapshot()[0];
        assert_eq!(p.services.len(), 2);
        assert!(p.alive(t0 + Duration::from_millis(1_999)));
        assert!(!p.alive(t0 + Duration::from_millis(2_000)));
        assert_eq!(
            table.take_changes(),
            Changes::from([("west".to_string(), Touched::All)])
        );
        assert!(table.take_changes().is_empty(), "taken once");
        table
            .apply(
                pb::ExportUpdate {
                    cluster: "west".into(),
                    lease_ms: 2_000,
                    removed: vec!["demo/a".into()],
                    ..Default::default()
                },
                t0 + Duration::from_secs(1),
            )
            .expect("applied");
        let p = &table.snapshot()[0];
        assert_eq!(
            p.services.keys().collect::<Vec<_>>(),
            vec![&crate::catalog::Key::from("demo/b")]
        );
        assert!(p.alive(t0 + Duration::from_millis(2_500)), "renewed");
        let touched = Touched::Keys([crate::catalog::Key::from("demo/a")].into());
        assert_eq!(table.take_changes(), Changes::from([("west".to_string(), touched)]));
    }

    #[test]
    fn an_update_changes_a_peers_map_in_place_and_names_what_it_touched() {
        let table = PeerTable::default();
        let update = |upserts: &[&str], removed: &[&str]| pb::ExportUpdate {
            cluster: "west".into(),
            lease_ms: 2_000,
            upserts: upserts
                .iter()
                .map(|name| pb::ExportedService {
                    name: name.to_string(),
                    namespace: "demo".into(),
                    ..Default::default()
                })
                .collect(),
            removed: removed.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        table.apply(update(&["a", "b"], &[]), Instant::now()).expect("applied");
        table.take_changes();
        let map = Arc::as_ptr(&table.snapshot()[0].services);
        // Nothing else holds the map between merges: the update does not copy it.
        table
            .apply(update(&["c"], &["demo/a", "demo/never-sent"]), Instant::now())
            .expect("applied");
        assert_eq!(Arc::as_ptr(&table.snapshot()[0].services), map);
        let keys = |k: &[&str]| Touched::Keys(k.iter().map(|k| crate::catalog::Key::from(*k)).collect());
        // What was added and removed, not a name the peer never sent.
        assert_eq!(
            table.take_changes(),
            Changes::from([("west".to_string(), keys(&["demo/a", "demo/c"]))])
        );
        // A snapshot held across an update (a merge pass in progress) gets its own map.
        let held = table.snapshot();
        table.apply(update(&["d"], &[]), Instant::now()).expect("applied");
        assert_ne!(
            Arc::as_ptr(&table.snapshot()[0].services),
            Arc::as_ptr(&held[0].services)
        );
        assert!(!held[0].services.contains_key("demo/d"));
    }

    /// Service `demo/<name>` with an endpoint per port given (two labels on each: a map
    /// digested in key order).
    fn service_of(name: &str, ports: &[u32]) -> pb::ExportedService {
        pb::ExportedService {
            name: name.into(),
            namespace: "demo".into(),
            ports: vec![pb::ServicePort {
                port: 80,
                ..Default::default()
            }],
            endpoints: ports
                .iter()
                .map(|p| pb::Endpoint {
                    address: format!("10.0.0.1:{p}"),
                    workload: format!("w-{p}"),
                    ready: true,
                    labels: [("app".to_string(), name.to_string()), ("port".into(), p.to_string())].into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A cluster's exports: each service by `demo/<name>`.
    fn services(list: &[pb::ExportedService]) -> Arc<Services> {
        Arc::new(
            list.iter()
                .map(|s| (Key::from(format!("demo/{}", s.name)), Arc::new(s.clone())))
                .collect(),
        )
    }

    #[test]
    fn a_patch_turns_the_held_export_into_the_new_one_when_it_is_the_smaller_message() {
        let old = service_of("a", &[1, 2, 3, 4, 5, 6]);
        // (what changed, the new endpoints, the splices and endpoints a patch carries)
        let cases = [
            ("one changed in place", &[1, 2, 30, 4, 5, 6][..], Some((1, 1))),
            ("the first and the last changed", &[10, 2, 3, 4, 5, 60], Some((2, 2))),
            ("three of six changed", &[10, 2, 30, 4, 50, 6], Some((3, 3))),
            ("two side by side changed", &[1, 20, 30, 4, 5, 6], Some((1, 2))),
            ("one added at the end", &[1, 2, 3, 4, 5, 6, 7], Some((1, 1))),
            ("one added in the middle", &[1, 2, 3, 35, 4, 5, 6], Some((1, 1))),
            ("one removed at the end", &[1, 2, 3, 4, 5], Some((1, 0))),
            ("the first removed", &[2, 3, 4, 5, 6], Some((1, 0))),
            ("every one removed: smaller whole", &[], None),
            ("four of six changed", &[10, 20, 30, 4, 50, 6], None),
            // Kept in address order (as the Kubernetes source keeps them), an endpoint replaced
            // by one that sorts elsewhere moves those between: one out, one in.
            (
                "one replaced by one sorting four places on",
                &[1, 3, 4, 5, 6, 7],
                Some((2, 1)),
            ),
            (
                "one replaced by one sorting four places back",
                &[0, 1, 2, 3, 4, 6],
                Some((2, 1)),
            ),
            ("two replaced, sorting further on", &[1, 4, 5, 6, 7, 8], None),
        ];
        for (what, ports, carries) in cases {
            let new = service_of("a", ports);
            let p = patch("demo/a", &old, &new);
            let counted = p.as_ref().map(|p| {
                let inserted = p.splices.iter().map(|s| s.inserted.len()).sum::<usize>();
                (p.splices.len(), inserted)
            });
            assert_eq!(counted, carries, "{what}");
            let Some(p) = p else { continue };
            assert_eq!((p.key.as_str(), p.base), ("demo/a", export_digest(&old)), "{what}");
            assert!(
                prost::Message::encoded_len(&p) < prost::Message::encoded_len(&new),
                "{what}: the patch is the smaller message"
            );
            let mut held = Arc::new(old.clone());
            apply_patch(&mut held, p).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(*held, new, "{what}: the receiver's copy comes out as the sender's");
            assert_eq!(export_digest(&held), export_digest(&new), "{what}");
        }
        // Anything besides the endpoints changed: sent whole.
        let mut ported = service_of("a", &[1, 2, 30, 4, 5, 6]);
        ported.ports[0].port = 81;
        assert!(patch("demo/a", &old, &ported).is_none());
        let mut older = service_of("a", &[1, 2, 30, 4, 5, 6]);
        older.exported_at_unix_ms = 1;
        assert!(patch("demo/a", &old, &older).is_none());
        let mut identities = service_of("a", &[1, 2, 30, 4, 5, 6]);
        identities.identities = vec!["spiffe://strait.local/ns/demo/sa/a".into()];
        assert!(patch("demo/a", &old, &identities).is_none());
    }

    #[test]
    fn a_patch_against_another_version_or_out_of_bounds_changes_nothing() {
        let old = service_of("a", &[1, 2, 3]);
        let p = patch("demo/a", &old, &service_of("a", &[1, 20, 3])).unwrap();
        let other = service_of("a", &[1, 2, 4]);
        let mut held = Arc::new(other.clone());
        let e = apply_patch(&mut held, p.clone()).unwrap_err();
        assert!(e.starts_with("made against version"), "{e}");
        assert_eq!(*held, other);
        let splice = |at: u32, removed: u32, inserted: &[u32]| pb::EndpointSplice {
            at,
            removed,
            inserted: service_of("a", inserted).endpoints,
        };
        let bad = [
            (
                "overlapping",
                vec![splice(0, 2, &[9]), splice(1, 1, &[])],
                "splice 1 (at 1, removing 1) overlaps",
            ),
            (
                "out of order",
                vec![splice(2, 0, &[9]), splice(1, 0, &[8])],
                "splice 1 (at 1, removing 0) overlaps",
            ),
            (
                "removing past the end",
                vec![splice(2, 2, &[])],
                "reaches past the 3 endpoints held",
            ),
            (
                "inserting past the end",
                vec![splice(4, 0, &[9])],
                "splice 0 (at 4, removing 0)",
            ),
        ];
        for (what, splices, says) in bad {
            let mut held = Arc::new(old.clone());
            let bad = pb::ServicePatch { splices, ..p.clone() };
            let e = apply_patch(&mut held, bad).unwrap_err();
            assert!(e.contains(says), "{what}: {e}");
            assert_eq!(*held, old, "{what}: nothing changed");
        }
        // Splices that touch end to end apply in order.
        let mut held = Arc::new(old.clone());
        let ends = pb::ServicePatch {
            splices: vec![splice(0, 1, &[7]), splice(1, 2, &[8, 9, 10])],
            ..p
        };
        apply_patch(&mut held, ends).unwrap();
        assert_eq!(*held, service_of("a", &[7, 8, 9, 10]));
    }

    #[test]
    fn a_peer_is_sent_patches_if_it_takes_them_and_refuses_one_made_against_another_version() {
        let before = services(&[service_of("a", &[1, 2, 3]), service_of("b", &[1, 2, 3])]);
        let now = services(&[
            service_of("a", &[1, 20, 3]),
            service_of("b", &[1, 2, 3, 4]),
            service_of("c", &[1]),
        ]);
        let table = PeerTable::default();
        let update = |full: bool, upserts, patches, removed| pb::ExportUpdate {
            cluster: "west".into(),
            lease_ms: 60_000,
            full,
            upserts,
            patches,
            removed,
            ..Default::default()
        };
        let whole = |s: &Services| s.values().map(|s| (**s).clone()).collect::<Vec<_>>();
        table
            .apply(update(true, whole(&before), vec![], vec![]), Instant::now())
            .expect("applied");
        table.take_changes();
        let change = ExportChange::between(&before, &now).unwrap();
        let patched: Vec<&str> = change.patches.keys().map(|k| &**k).collect();
        assert_eq!(patched, ["demo/a", "demo/b"]);
        let exports = Exports {
            services: now.clone(),
            change: Some(Arc::new(change)),
            ..Default::default()
        };
        // A receiver of an older build is sent every changed service whole.
        let (upserts, patches, removed) = services_delta(&before, &exports, false);
        assert_eq!((upserts.len(), patches.len(), removed.len()), (3, 0, 0));
        // Else the change's patches, the same from a walk (a sender further behind).
        let (upserts, patches, removed) = services_delta(&before, &exports, true);
        let copy = Arc::new(before.as_ref().clone());
        assert_eq!(
            services_delta(&copy, &exports, true),
            (upserts.clone(), patches.clone(), removed.clone())
        );
        let names: Vec<&str> = upserts.iter().map(|s| s.name.as_str()).collect();
        assert_eq!((names, patches.len()), (vec!["c"], 2));
        table
            .apply(update(false, upserts, patches, removed), Instant::now())
            .expect("applied");
        let held = |table: &PeerTable| table.snapshot()[0].services.clone();
        assert_eq!(*held(&table), *now, "the receiver holds what the sender exports");
        assert_eq!(
            table.take_changes().get("west"),
            Some(&Touched::Keys(now.keys().cloned().collect()))
        );
        // A patch made against a version no longer held, and one of a service never held, are
        // refused; the rest of their update applies.
        let stale = patch("demo/a", &service_of("a", &[1, 2, 3]), &service_of("a", &[1, 2, 30])).unwrap();
        let unknown = patch("demo/x", &service_of("x", &[1, 2]), &service_of("x", &[1, 2, 3])).unwrap();
        let e = table
            .apply(
                update(false, vec![service_of("d", &[1])], vec![stale, unknown], vec![]),
                Instant::now(),
            )
            .unwrap_err();
        assert!(
            e.contains("demo/a: made against version") && e.contains("demo/x: not held"),
            "{e}"
        );
        let after = held(&table);
        assert_eq!(after.get("demo/a"), now.get("demo/a"), "demo/a is kept as held");
        assert!(after.contains_key("demo/d") && !after.contains_key("demo/x"));
    }

    /// The whole path over real mutual TLS gRPC on loopback: a [`PeerClient`] exporting to a
    /// [`PeeringServer`] whose table holds another version of one service than the sender
    /// thinks. The update patching it and another service applies the other, ends the stream
    /// with FAILED_PRECONDITION, and the sender reconnects, is told what is held and sends
    /// that one service whole.
    #[tokio::test]
    async fn a_refused_patch_ends_the_stream_and_the_sender_resends_that_service_whole() {
        use strait_trust::{Authority, ServerAuth, TlsMetrics, TrustBundle, TrustDomain};
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let root = Authority::new_root(&td, SystemTime::now()).unwrap();
        let mut bundle = TrustBundle::new();
        bundle.add_root(&td, root.cert().clone()).unwrap();
        let controller = SpiffeId::workload(&td, strait_api::SYSTEM_NAMESPACE, strait_api::FEDERATION_SA).unwrap();
        let store = |cluster: &str| {
            let ca = root.new_intermediate(cluster, SystemTime::now()).unwrap();
            let ttl = Duration::from_secs(3600);
            CertStore::issued_by(&ca, controller.clone(), ttl, bundle.clone(), TlsMetrics::unregistered()).unwrap()
        };
        let (west, east) = (store("west"), store("east"));

        let table = PeerTable::default();
        let server_tls = strait_trust::server_config(
            &west,
            PeerPolicy::AnyInBundle,
            ServerAuth::RequireClientCert,
            &[strait_trust::ALPN_H2],
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = PeeringServer {
            table: table.clone(),
            own_cluster: "west".into(),
            log: None,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(strait_api::pb::peering_service_server::PeeringServiceServer::new(
                    server,
                ))
                .serve_with_incoming(strait_api::transport::tls_incoming(listener, Arc::new(server_tls))),
        );

        let client_tls = Arc::new(
            strait_trust::client_config(
                Some(&east),
                east.bundle(),
                east.metrics(),
                PeerPolicy::OneOf(vec![controller.clone()]),
                &[strait_trust::ALPN_H2],
            )
            .unwrap(),
        );
        let v1 = services(&[service_of("a", &[1, 2, 3]), service_of("b", &[1, 2, 3])]);
        let (exports_tx, exports_rx) = watch::channel(Arc::new(Exports {
            services: v1.clone(),
            ..Default::default()
        }));
        let (_traffic_tx, traffic_rx) = watch::channel(Arc::new(pb::TrafficSummary::default()));
        let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
        let client = PeerClient {
            peer: crate::config::Peer {
                name: "west".into(),
                gateway: addr,
            },
            cluster: "east".into(),
            region: "us-east".into(),
            lease: Duration::from_secs(30),
            gateway: pb::Gateway::default(),
            dial: Arc::new(move || {
                Ok(strait_api::transport::tls_channel(
                    &addr.to_string(),
                    client_tls.clone(),
                ))
            }),
            exports: exports_rx,
            traffic: traffic_rx,
            metrics: metrics.clone(),
        };
        let sender = tokio::spawn(client.run());
        let held = |table: &PeerTable| table.snapshot().first().map(|p| p.services.clone()).unwrap_or_default();
        let settled = |want: Arc<Services>| {
            let table = table.clone();
            async move {
                for _ in 0..1000 {
                    if *held(&table) == *want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("west holds {:?}, not {:?}", held(&table), want);
            }
        };
        settled(v1.clone()).await;

        // West comes to hold another version of demo/a than east sent (as a lost record would).
        let other = service_of("a", &[1, 2, 4]);
        let update = pb::ExportUpdate {
            cluster: "east".into(),
            lease_ms: 30_000,
            upserts: vec![other.clone()],
            ..Default::default()
        };
        table.apply(update, Instant::now()).unwrap();
        // East changes one endpoint of each: both go as patches, demo/a's against v1's.
        let v2 = services(&[service_of("a", &[1, 20, 3]), service_of("b", &[1, 2, 30])]);
        exports_tx
            .send(Arc::new(Exports {
                services: v2.clone(),
                ..Default::default()
            }))
            .unwrap();
        settled(v2.clone()).await;
        sender.abort();

        let count = |m: &prometheus::IntCounterVec, label: &str| m.with_label_values(&["west", label]).get();
        assert_eq!(count(&metrics.services, "patch"), 2, "both changes went as patches");
        // Whole: the two of the first update, then demo/a alone after the resume (demo/b's patch
        // applied with the refused one: west held its new version and was not sent it again).
        assert_eq!(count(&metrics.services, "whole"), 3);
        assert_eq!(
            (count(&metrics.updates, "full"), count(&metrics.updates, "resumed")),
            (1, 1),
            "one stream ended, and the next resumed"
        );
    }
}
