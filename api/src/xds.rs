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

/// The most a proxy's `Hello.held` may take encoded; a proxy holding more says nothing of what
/// it holds and is sent the whole state. 2 MiB lists about 45,000 resources (50 clusters × 300
/// services in parts take 15,300); the controller reads a Hello of up to 4 MiB.
pub const HELD_BYTES: usize = 2 << 20;

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
        // every proxy at once).
        let held_bytes;
        (hello.held, held_bytes) = resources.held(HELD_BYTES);
        let held = hello.held.len();
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
                    held,
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
