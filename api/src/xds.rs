//! The proxy side of the config stream.
//!
//! A proxy opens one bidirectional gRPC stream to its controller, says who it is, and receives
//! versioned updates; it applies each ([`Resources::apply`]), publishes the new snapshot, and
//! ACKs the version with the names of any resource it refused. When the controller is away the
//! proxy keeps serving its last snapshot and reconnects with backoff, saying what it holds
//! ([`Resources::held`]) so that the controller sends only what differs from it.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use strait_trust::{CertStore, PeerPolicy, SpiffeId};
use tokio::sync::watch;

use crate::pb;
use crate::pb::config_service_client::ConfigServiceClient;
use crate::snapshot::{Resources, Snapshot};

#[derive(Clone, Debug)]
pub struct XdsMetrics {
    updates: IntCounterVec,
    version: IntGauge,
    connected: IntGauge,
}

impl XdsMetrics {
    pub fn new(registry: &Registry) -> Self {
        let updates = IntCounterVec::new(
            Opts::new(
                "strait_config_updates_total",
                "Config resources received from the controller, by result (applied or rejected)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let version = IntGauge::new("strait_config_version", "Version of the config snapshot being served")
            .expect("valid metric");
        let connected = IntGauge::new(
            "strait_config_connected",
            "1 while the config stream to the controller is up",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(updates.clone()));
        let _ = registry.register(Box::new(version.clone()));
        let _ = registry.register(Box::new(connected.clone()));
        XdsMetrics {
            updates,
            version,
            connected,
        }
    }
}

/// The most a proxy's `Hello.held` may take encoded (a proxy of this build says what it holds in
/// `held_digests` instead; the list, read from older proxies, stays bounded so): a proxy
/// holding more says nothing of what it holds and is sent the whole state. 2 MiB lists about
/// 45,000 resources (50 clusters × 300 services in parts take 15,300); the controller reads a
/// Hello of up to 4 MiB.
pub const HELD_BYTES: usize = 2 << 20;

/// How many buckets a proxy holding `groups` services and other resources hashes them into for
/// `Hello.held_digests`: about two to a bucket, a power of two from 16 to 4,096 (8 bytes each:
/// 2 KiB for the published clusterset's 300 services, where their list took 128 KB).
pub fn buckets_for(groups: usize) -> usize {
    (groups / 2).next_power_of_two().clamp(16, 4096)
}

/// Whether a `held_digests` list has a length a proxy would send (a controller that reads
/// another sends the whole state).
pub fn valid_buckets(buckets: usize) -> bool {
    buckets.is_power_of_two() && (16..=4096).contains(&buckets)
}

/// FNV-1a, 64 bits, then a finalizer that spreads every input bit over the result: fixed by
/// this protocol (proxy and controller may be different builds), unlike std's hashers.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // splitmix64's finalizer.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The bucket of a held resource out of `buckets` (a power of two): a cluster's endpoints of a
/// service (`endpoints/<ns>/<name>/<cluster>`) go with the service (`service/<ns>/<name>`), so a
/// bucket always holds services whole.
pub fn bucket_of(name: &str, buckets: usize) -> usize {
    let h = match name.strip_prefix("endpoints/").and_then(|rest| rest.rsplit_once('/')) {
        Some((service, _cluster)) => hash(&[b"service/", service.as_bytes()]),
        None => hash(&[name.as_bytes()]),
    };
    (h as usize) & (buckets - 1)
}

/// One held resource's share of its bucket's digest (which is the wrapping sum of its
/// resources'): its name and its version's 8 bytes (`snapshot::fingerprint`).
pub fn held_item(name: &str, version: u64) -> u64 {
    hash(&[name.as_bytes(), &[0], &version.to_le_bytes()])
}

pub struct XdsClient {
    /// `host:port` of the controller.
    pub controller: String,
    pub controller_id: SpiffeId,
    pub hello: pb::Hello,
    pub store: CertStore,
    pub metrics: XdsMetrics,
}

impl XdsClient {
    /// Runs forever, publishing every accepted snapshot on `tx`.
    pub async fn run(self, tx: watch::Sender<Arc<Snapshot>>) {
        let mut resources = Resources::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(&tx, &mut resources).await {
                Ok(()) => {
                    tracing::info!(controller = %self.controller, "config stream closed by controller; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(controller = %self.controller, error = %e, "config stream failed; serving the last good config")
                }
            }
            self.metrics.connected.set(0);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self, tx: &watch::Sender<Arc<Snapshot>>, resources: &mut Resources) -> Result<(), tonic::Status> {
        let config = strait_trust::client_config(
            Some(&self.store),
            self.store.bundle(),
            self.store.metrics(),
            PeerPolicy::OneOf(vec![self.controller_id.clone()]),
            &[strait_trust::ALPN_H2],
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let channel = crate::transport::tls_channel(&self.controller, Arc::new(config));
        let mut client = ConfigServiceClient::new(channel).max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
        let mut hello = self.hello.clone();
        hello.have_version = tx.borrow().version;
        hello.accepts_parts = true;
        hello.accepts_endpoint_parts = true;
        // What it holds, so that the controller sends only what differs from it (a reconnect,
        // or a controller that restarted, would otherwise send the whole catalog again to
        // every proxy at once): a digest of each bucket of it, a few KiB whatever it holds.
        hello.held_digests = resources.held_digests();
        let held = hello.held_digests.len();
        let held_bytes = prost::Message::encoded_len(&pb::Hello {
            held_digests: hello.held_digests.clone(),
            ..Default::default()
        });
        let _ = out_tx
            .send(pb::ProxyMessage {
                kind: Some(pb::proxy_message::Kind::Hello(hello)),
            })
            .await;
        let mut inbound = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(out_rx))
            .await?
            .into_inner();
        self.metrics.connected.set(1);
        let mut pending = resources.pending();
        let mut first = true;
        while let Some(part) = inbound.message().await? {
            if !pending.add(part, resources) {
                continue;
            }
            let update = std::mem::take(&mut pending);
            let prev = tx.borrow().clone();
            let (version, received, parts, full) = (update.version(), update.received(), update.parts(), update.full());
            let (unchanged, removed) = (update.unchanged(), update.removed());
            let (snapshot, rejected) = resources.update_with(&prev, update);
            pending = resources.pending();
            drop(prev);
            if let Some(bundle) = &snapshot.bundle {
                self.store.set_bundle(bundle.clone());
            }
            let applied = received - rejected.len();
            self.metrics
                .updates
                .with_label_values(&["applied"])
                .inc_by(applied as u64);
            self.metrics
                .updates
                .with_label_values(&["rejected"])
                .inc_by(rejected.len() as u64);
            self.metrics.version.set(version as i64);
            if full {
                // Once per stream: the whole state, in as many parts as its size took.
                tracing::info!(
                    version,
                    applied,
                    unchanged,
                    rejected = rejected.len(),
                    parts,
                    "full config applied"
                );
            } else if first && held > 0 {
                // The controller read what the proxy said it held and sent only the difference.
                tracing::info!(
                    version,
                    held_buckets = held,
                    held_bytes,
                    applied,
                    removed,
                    rejected = rejected.len(),
                    parts,
                    "config resumed: only what differs from what this proxy held was sent"
                );
            } else {
                tracing::debug!(version, applied, rejected = rejected.len(), "config applied");
            }
            first = false;
            tx.send_replace(Arc::new(snapshot));
            let ack = pb::ProxyMessage {
                kind: Some(pb::proxy_message::Kind::Ack(pb::Ack { version, rejected })),
            };
            if out_tx.send(ack).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
